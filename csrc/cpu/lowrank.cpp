// CPU kernel of the single-adapter low-rank job (csrc/lowrank.h): shrink u = x A^T,
// expand y += s * u B^T, with optional dropout masks; used by lora_apply_ and lora_linear.
//
// Tiling: A and B are packed once per call into fp32 16-wide panels (A^T: [in][16] per 16 ranks,
// B^T: [r][16] per 16 output columns). Tokens are split into blocks of kTB rows across threads
// (at::parallel_for); for each block the fp32 [kTB, r] intermediate stays in a thread-local
// buffer (L1/L2) between the shrink and the expand, so x is read once and y is read and written
// once. fp16/bf16 (and masked) rows are converted to fp32 on the fly; the 6x16 micro-kernel
// (microkernel.h) does all the arithmetic.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "../lowrank.h"
#include "kernels.h"
#include "microkernel.h"

namespace lora_ext::cpu {
namespace {

constexpr int64_t kTB = 4 * kMR;  // tokens per thread block

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
float to_f32(T v) {
  return static_cast<float>(v);
}

template <class T>
void run(const LowRankJob& j) {
  const int64_t in = j.in, out = j.out, r = j.r;
  const int64_t rp = ceil_div(r, kNR), op = ceil_div(out, kNR), rpad = rp * kNR;
  const bool shrink = j.x != nullptr, expand = j.y != nullptr;
  const T* x = static_cast<const T*>(j.x);
  T* y = static_cast<T*>(j.y);
  const Dropout drop = Dropout::make(j.dropout_p, j.seed ? static_cast<uint64_t>(*j.seed) : 0);
  const bool mask_x = j.dropout_p > 0.f && j.mask_x, mask_y = j.dropout_p > 0.f && j.mask_y;

  std::vector<float> Apk(shrink ? rp * in * kNR : 0), Bpk(expand ? op * r * kNR : 0);
  const int64_t npa = shrink ? rp : 0, npb = expand ? op : 0;
  at::parallel_for(0, npa + npb, 1, [&](int64_t b, int64_t e) {
    // panels [0, npa) pack A^T, panels [npa, npa + npb) pack B^T
    if (b < npa)
      pack_panels(static_cast<const T*>(j.A), r, in, in, Apk.data(), to_f32<T>, b, std::min(e, npa));
    if (e > npa)
      pack_panels(static_cast<const T*>(j.B), out, r, r, Bpk.data(), to_f32<T>,
                  std::max(b, npa) - npa, e - npa);
  });

  constexpr bool kF32 = std::is_same_v<T, float>;
  at::parallel_for(0, ceil_div(j.T, kTB), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> zeros(std::max(in, rpad), 0.f);
    std::vector<float> xbuf(shrink && (!kF32 || mask_x) ? kTB * in : 0);
    std::vector<float> u(kTB * rpad, 0.f);
    float tile[kMR][kNR];
    const float* rows[kMR];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kTB, nt = std::min(kTB, j.T - t0);
      if (shrink) {
        // Left-operand rows in fp32: read in place for unmasked fp32, else converted/masked.
        if (!xbuf.empty()) {
          for (int64_t i = 0; i < nt; ++i) {
            const T* src = x + (t0 + i) * j.ldx;
            float* dst = xbuf.data() + i * in;
            const uint64_t base = static_cast<uint64_t>(t0 + i) * in;
            for (int64_t k = 0; k < in; ++k)
              dst[k] = static_cast<float>(src[k]) * (mask_x ? drop.factor(base + k) : 1.f);
          }
        }
        for (int64_t p = 0; p < rp; ++p) {
          for (int64_t g = 0; g < nt; g += kMR) {
            for (int m = 0; m < kMR; ++m) {
              const int64_t i = g + m;
              rows[m] = i >= nt ? zeros.data()
                        : xbuf.empty() ? reinterpret_cast<const float*>(x + (t0 + i) * j.ldx)
                                       : xbuf.data() + i * in;
            }
            micro_6x16(in, rows, Apk.data() + p * in * kNR, tile);
            for (int m = 0; m < kMR && g + m < nt; ++m)
              std::copy(tile[m], tile[m] + kNR, u.data() + (g + m) * rpad + p * kNR);
          }
        }
        if (j.u)
          for (int64_t i = 0; i < nt; ++i)
            std::copy(u.data() + i * rpad, u.data() + i * rpad + r, j.u + (t0 + i) * r);
      } else {
        for (int64_t i = 0; i < nt; ++i)
          std::copy(j.u + (t0 + i) * r, j.u + (t0 + i + 1) * r, u.data() + i * rpad);
      }
      if (!expand) continue;
      for (int64_t p = 0; p < op; ++p) {
        const int64_t o0 = p * kNR, nc = std::min<int64_t>(kNR, out - o0);
        for (int64_t g = 0; g < nt; g += kMR) {
          for (int m = 0; m < kMR; ++m) rows[m] = g + m < nt ? u.data() + (g + m) * rpad : zeros.data();
          micro_6x16(r, rows, Bpk.data() + p * r * kNR, tile);
          for (int m = 0; m < kMR && g + m < nt; ++m) {
            const int64_t t = t0 + g + m;
            T* yr = y + t * j.ldy + o0;
            const uint64_t base = static_cast<uint64_t>(t) * out + o0;
            for (int64_t c = 0; c < nc; ++c) {
              const float f = j.scale * (mask_y ? drop.factor(base + c) : 1.f);
              yr[c] = static_cast<T>(static_cast<float>(yr[c]) + f * tile[m][c]);
            }
          }
        }
      }
    }
  });
}

}  // namespace

void lowrank_cpu(DType dt, const LowRankJob& job) {
  if (job.T == 0) return;
  dispatch_dtype<float, c10::Half, c10::BFloat16>(dt, [&](auto tag) {
    run<typename decltype(tag)::type>(job);
  });
}

}  // namespace lora_ext::cpu
