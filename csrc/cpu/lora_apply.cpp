// CPU kernel of lora_apply_: y[T, out] += s * (x[T, in] @ A[r, in]^T) @ B[out, r]^T.
//
// Tiling: A and B are packed once per call into fp32 16-wide panels (A^T: [in][16]
// per 16 ranks, B^T: [r][16] per 16 output columns). Tokens are split into blocks
// of kTB rows across threads (at::parallel_for); for each block the fp32 [kTB, r]
// intermediate u = s * x A^T stays in a thread-local buffer (L1/L2), and the
// expand adds u B^T into y in one read-modify-write pass. x is read once, y is
// read and written once; fp16/bf16 rows are converted to fp32 on the fly.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
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
void lora_apply_impl(const LoraApplyArgs& a, float scale) {
  const int64_t T_ = a.T, in = a.in, out = a.out, r = a.r;
  const int64_t rp = ceil_div(r, kNR), op = ceil_div(out, kNR), rpad = rp * kNR;
  const T* x = a.x2.data_ptr<T>();
  const int64_t ldx = a.x2.size(0) > 1 ? a.x2.stride(0) : in;
  T* y = a.y2.data_ptr<T>();
  const int64_t ldy = a.y2.size(0) > 1 ? a.y2.stride(0) : out;

  std::vector<float> Apk(rp * in * kNR), Bpk(op * r * kNR);
  at::parallel_for(0, rp + op, 1, [&](int64_t b, int64_t e) {
    // panels [0, rp) pack A^T, panels [rp, rp + op) pack B^T
    pack_panels(a.A.data_ptr<T>(), r, in, in, Apk.data(), to_f32<T>, std::min(b, rp),
                std::min(e, rp));
    pack_panels(a.B.data_ptr<T>(), out, r, r, Bpk.data(), to_f32<T>, std::max(b, rp) - rp,
                std::max(e, rp) - rp);
  });

  const int64_t nblocks = ceil_div(T_, kTB);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> zeros(std::max(in, rpad), 0.f);
    std::vector<float> xbuf(std::is_same_v<T, float> ? 0 : kTB * in);
    std::vector<float> u(kTB * rpad);
    float tile[kMR][kNR];
    const float* rows[kMR];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kTB, nt = std::min(kTB, T_ - t0);
      // Left-operand rows of this block in fp32 (in place for fp32 inputs).
      auto xrow = [&](int64_t i) -> const float* {
        if (i >= nt) return zeros.data();
        if constexpr (std::is_same_v<T, float>) {
          return x + (t0 + i) * ldx;
        } else {
          return xbuf.data() + i * in;
        }
      };
      if constexpr (!std::is_same_v<T, float>) {
        for (int64_t i = 0; i < nt; ++i) {
          const T* src = x + (t0 + i) * ldx;
          float* dst = xbuf.data() + i * in;
          for (int64_t k = 0; k < in; ++k) dst[k] = static_cast<float>(src[k]);
        }
      }
      // Shrink: u[i, :] = s * x[t0 + i, :] @ A^T
      for (int64_t p = 0; p < rp; ++p) {
        for (int64_t g = 0; g < nt; g += kMR) {
          for (int m = 0; m < kMR; ++m) rows[m] = xrow(g + m);
          micro_6x16(in, rows, Apk.data() + p * in * kNR, tile);
          for (int m = 0; m < kMR && g + m < nt; ++m)
            for (int c = 0; c < kNR; ++c) u[(g + m) * rpad + p * kNR + c] = scale * tile[m][c];
        }
      }
      // Expand: y[t0 + i, :] += u[i, :r] @ B^T
      for (int64_t p = 0; p < op; ++p) {
        const int64_t o0 = p * kNR, nc = std::min<int64_t>(kNR, out - o0);
        for (int64_t g = 0; g < nt; g += kMR) {
          for (int m = 0; m < kMR; ++m) rows[m] = g + m < nt ? u.data() + (g + m) * rpad : zeros.data();
          micro_6x16(r, rows, Bpk.data() + p * r * kNR, tile);
          for (int m = 0; m < kMR && g + m < nt; ++m) {
            T* yr = y + (t0 + g + m) * ldy + o0;
            for (int64_t c = 0; c < nc; ++c) yr[c] = static_cast<T>(static_cast<float>(yr[c]) + tile[m][c]);
          }
        }
      }
    }
  });
}

}  // namespace

void lora_apply_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    double scale) {
  LoraApplyArgs a = check_lora_apply("lora_apply_", y, x, A, B);
  TORCH_CHECK(x.device().is_cpu(), "lora_apply_: CPU kernel called with x on ", x.device());
  if (a.T == 0 || a.out == 0) return;
  dispatch_dtype<float, c10::Half, c10::BFloat16>(a.dtype, [&](auto tag) {
    lora_apply_impl<typename decltype(tag)::type>(a, static_cast<float>(scale));
  });
  if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
}

}  // namespace lora_ext::cpu
