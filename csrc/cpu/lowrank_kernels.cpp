// CPU kernel of the single-adapter low-rank job (csrc/lowrank_job.h): shrink u = x A^T,
// expand y += s * u B^T, with optional dropout masks; used by lora_apply_ and lora_linear.
//
// Tiling: A and B are packed once per call into fp32 16-wide panels (A^T: [in][16] per 16 ranks,
// B^T: [r][16] per 16 output columns). Tokens are split into blocks of up to kTB rows (fewer when
// T is small, so every thread gets blocks) across threads (at::parallel_for); for each block the
// fp32 [block, r] intermediate stays in a thread-local
// buffer (L1/L2) between the shrink and the expand, so x is read once and y is read and written
// once (written only, with overwrite_y). x rows are read in place (fp32; bf16 by the AVX512-BF16
// shrink, bf16_dot.cpp, where the CPU has it) or converted to fp32 per block (fp16, masked); y rows
// are read and written in place, rounded once in the micro-kernel's epilogue. The 6x16 micro-kernel
// (lowrank_microkernel.h) does the shrink and expand arithmetic.
// lora_linear's backward adds the weight gradients to the same pass: while a block of g (the job's
// x) and of the forward's x is in cache, the 8x16 T^T N micro-kernel accumulates dB^T += uf^T g and
// dA += gB^T xf into fp32 partials of the block's chunk (blocks of kTB tokens, grad_chunks(T)
// chunks), summed in chunk order at the end.
// Few tokens (decode, T <= kSmallT, no dropout): packing would cost more than the product, so
// the unpacked vector kernels of multi_microkernel.h run instead, parallel over ranks (shrink)
// and over output rows (expand).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "../lowrank_job.h"
#include "ops_cpu.h"
#include "lowrank_microkernel.h"
#include "multi_microkernel.h"
#include "rows16.h"

namespace lora_ext::cpu {
namespace {


inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
float elem_to_f32(T v) {
  return static_cast<float>(v);
}

constexpr int64_t kSmallT = 16;
// run_small's work items: rank rows (even: shrink_tile's pairs) and output rows (a multiple of 8)
constexpr int64_t kSmallRB = 4, kSmallOB = 64;

// Element types of multi_microkernel.h: same bits as the c10 types.
template <class T>
struct Bits {
  using type = T;
};
template <>
struct Bits<c10::Half> {
  using type = _Float16;
};
template <>
struct Bits<c10::BFloat16> {
  using type = uint16_t;
};

#define LORA_EXT_SMALL_KERNELS(E, SUF)                                                       \
  inline void shrink_small(const E* A, int64_t lda, int64_t r, const E* const* x, int nt,   \
                           int64_t K, float* const* u) {                                     \
    shrink_tile_##SUF(A, lda, r, x, nt, K, u);                                               \
  }                                                                                          \
  inline void expand_small(const E* B, int64_t ldb, int64_t r, int64_t n, const float* u,   \
                           float* out) {                                                     \
    expand_rows_##SUF(B, ldb, r, n, u, out);                                                 \
  }
LORA_EXT_SMALL_KERNELS(float, f32)
LORA_EXT_SMALL_KERNELS(_Float16, f16)
LORA_EXT_SMALL_KERNELS(uint16_t, bf16)
#undef LORA_EXT_SMALL_KERNELS

// fp32 <-> rows of E (rows16.h for the 16-bit types: c10's rounding, 8 lanes at a time)
inline void widen_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void narrow_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
template <class E>
void widen_row(const E* src, int64_t n, float* dst) {
  to_f32(src, n, dst);
}
template <class E>
void narrow_row(const float* src, int64_t n, E* dst) {
  from_f32(src, n, dst);
}
template <class T>
const typename Bits<T>::type* bits_of(const T* p) {
  return reinterpret_cast<const typename Bits<T>::type*>(p);
}

// T <= kSmallT tokens, no masks: u = x A^T by rank blocks, y += s u B^T by output-row blocks.
template <class T>
void run_small(const LowRankJob& j) {
  using E = typename Bits<T>::type;
  const int64_t in = j.in, out = j.out, r = j.r, nt = j.T;
  std::vector<float> ubuf(j.u ? 0 : nt * r);
  float* u = j.u ? j.u : ubuf.data();
  if (j.x != nullptr) {
    const E* x[kSmallT];
    for (int64_t t = 0; t < nt; ++t)
      x[t] = reinterpret_cast<const E*>(static_cast<const T*>(j.x) + t * j.ldx);
    const E* A = static_cast<const E*>(j.A);
    // Work items of kSmallRB rank rows at fixed offsets (not parallel_for's thread-count dependent
    // split of 0..r): shrink_tile pairs rank rows from the start of its range, and a row summed
    // alone rounds differently from one in a pair, so the split must not move with the threads.
    at::parallel_for(0, ceil_div(r, kSmallRB), 1, [&](int64_t ib, int64_t ie) {
      const int64_t j0 = ib * kSmallRB, j1 = std::min(r, ie * kSmallRB);
      for (int64_t t0 = 0; t0 < nt; t0 += 4) {
        float* urows[4];
        for (int i = 0; i < 4; ++i) urows[i] = u + std::min(t0 + i, nt - 1) * r + j0;
        shrink_small(A + j0 * in, in, j1 - j0, x + t0, static_cast<int>(std::min<int64_t>(4, nt - t0)),
                     in, urows);
      }
    });
  }
  if (j.y == nullptr) return;
  const E* B = static_cast<const E*>(j.B);
  const T* bias = static_cast<const T*>(j.bias);
  // Output rows in blocks at fixed multiples of kSmallOB (expand_rows folds groups of 8 rows from
  // the start of its range and sums a tail row on its own: the bits must not depend on the split).
  at::parallel_for(0, ceil_div(out, kSmallOB), 1, [&](int64_t ib, int64_t ie) {
    const int64_t o0 = ib * kSmallOB, o1 = std::min(out, ie * kSmallOB);
    const int64_t n = o1 - o0;
    std::vector<float> acc(n), b0(j.overwrite_y ? n : 0, 0.f);
    if (j.overwrite_y && bias) widen_row(bits_of(bias + o0), n, b0.data());
    // 16-bit B rows widened once for all tokens (not once per token) when there are several
    std::vector<float> Bw(!std::is_same_v<T, float> && nt > 1 ? n * r : 0);
    if (!Bw.empty()) widen_row(B + o0 * r, n * r, Bw.data());
    for (int64_t t = 0; t < nt; ++t) {
      if (Bw.empty()) {
        expand_small(B + o0 * r, r, r, n, u + t * r, acc.data());
      } else {
        expand_rows_f32(Bw.data(), r, r, n, u + t * r, acc.data());
      }
      T* yr = static_cast<T*>(j.y) + t * j.ldy + o0;
      if (j.overwrite_y) {  // y = bias + s * acc, rounded once
        for (int64_t o = 0; o < n; ++o) acc[o] = b0[o] + j.scale * acc[o];
        narrow_row(acc.data(), n, reinterpret_cast<E*>(yr));
      } else if constexpr (std::is_same_v<T, float>) {
        for (int64_t o = 0; o < n; ++o) yr[o] = yr[o] + j.scale * acc[o];
      } else {
        axpy_rounded(reinterpret_cast<E*>(yr), acc.data(), j.scale, n);
      }
    }
  });
}

// c[j, 0:N] += sum_{k < K} a[k * lda + j] * brows[k][0:N] for j < r (a zero padded to whole
// groups of kTR columns): the weight-gradient update of one token block.
void tn_update(int64_t K, const float* a, int64_t lda, int64_t r, const float* const* brows,
               int64_t N, float* c) {
  float scratch[kNR];
  float* crow[kTR];
  int64_t n0 = 0;
  for (; n0 + kNR <= N; n0 += kNR) {
    for (int64_t j0 = 0; j0 < r; j0 += kTR) {
      for (int m = 0; m < kTR; ++m) crow[m] = j0 + m < r ? c + (j0 + m) * N + n0 : scratch;
      micro_tn_8x16_acc(K, a + j0, lda, brows, n0, crow);
    }
  }
  for (int64_t j = 0; j < r && n0 < N; ++j)
    for (int64_t n = n0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += a[k * lda + j] * brows[k][n];
      c[j * N + n] += acc;
    }
}

// Token blocks are grouped into chunks, each with its own fp32 weight-gradient partials, summed in
// chunk order: the count depends on T only (so do the bits, not on the thread count): 16 chunks,
// more for long inputs (at least 1024 tokens each, at most 256) so that many threads stay busy
// while the partials stay small next to the work.
int64_t grad_chunks(int64_t T, int64_t nblk) {
  return std::min(nblk, std::clamp<int64_t>(T / 1024, 16, 256));
}

template <class T>
void run(const LowRankJob& j) {
  const int64_t in = j.in, out = j.out, r = j.r, nf = j.nf;
  const int64_t rp = ceil_div(r, kNR), op = ceil_div(out, kNR), rpad = rp * kNR;
  const int64_t us = rpad;  // u row stride: whole rank groups of kTR (zero padded), kTR | kNR
  const bool shrink = j.x != nullptr, expand = j.y != nullptr;
  const bool want_dA = j.dA != nullptr, want_dB = j.dBt != nullptr, grads = want_dA || want_dB;
  const T* x = static_cast<const T*>(j.x);
  T* y = static_cast<T*>(j.y);
  const T* bias = static_cast<const T*>(j.bias);
  const Dropout drop = Dropout::make(j.dropout_p, j.seed ? static_cast<uint64_t>(*j.seed) : 0);
  const bool mask_x = j.dropout_p > 0.f && j.mask_x, mask_y = j.dropout_p > 0.f && j.mask_y;
  const bool mask_xf = j.dropout_p > 0.f && j.mask_xf;

  using E = typename Bits<T>::type;
  constexpr bool kF32 = std::is_same_v<T, float>;
  // bf16 x rows read in place by the dot-product shrink (A as bf16 pairs); dB's update still
  // reads fp32 rows of x (xbuf).
  const bool dot = std::is_same_v<T, c10::BFloat16> && shrink && !mask_x && bf16_dot();
  const int64_t in2 = (in + 1) / 2 * 2;
  std::vector<float> Apk(shrink && !dot ? rp * in * kNR : 0), Bpk(expand ? op * r * kNR : 0);
  std::vector<uint16_t> Apk2(dot ? rp * in2 * kNR : 0);
  // Packing work items: A in (panel, kPackK columns) pieces, so a few rank panels still spread
  // over the threads; then one item per B panel.
  constexpr int64_t kPackK = 1024;  // even: pieces start on a bf16 pair
  const int64_t akc = ceil_div(in, kPackK), npa = shrink ? rp * akc : 0, npb = expand ? op : 0;
  at::parallel_for(0, npa + npb, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < std::min(e, npa); ++i) {
      const int64_t p = i / akc, k0 = i % akc * kPackK, kn = std::min(kPackK, in - k0);
      const int64_t rows = std::min<int64_t>(kNR, r - p * kNR);
      const T* src = static_cast<const T*>(j.A) + p * kNR * in + k0;
      if (dot) {
        pack_pairs_bf16(reinterpret_cast<const uint16_t*>(src), rows, kn, in,
                        Apk2.data() + (p * in2 + k0) * kNR, 0, 1);
      } else {
        pack_panels(src, rows, kn, in, Apk.data() + (p * in + k0) * kNR, elem_to_f32<T>, 0, 1);
      }
    }
    if (e > npa)
      pack_panels(static_cast<const T*>(j.B), out, r, r, Bpk.data(), elem_to_f32<T>,
                  std::max(b, npa) - npa, e - npa);
  });

  // at least ~4 blocks per thread, in whole micro tiles (fixed when gradients are accumulated)
  const int64_t tb = grads ? kTB : std::min(kTB, kMR * ceil_div(ceil_div(j.T, 4 * at::get_num_threads()), kMR));
  const int64_t nblk = ceil_div(j.T, tb), nchunk = grads ? grad_chunks(j.T, nblk) : nblk;
  const int64_t gsize = r * ((want_dA ? nf : 0) + (want_dB ? in : 0));  // partials per chunk
  // each thread zeroes its own chunks' partials (in parallel, first touch by their user)
  const std::unique_ptr<float[]> partials(new float[nchunk * gsize]);
  at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
    std::fill(partials.get() + c0 * gsize, partials.get() + c1 * gsize, 0.f);
    std::vector<float> zeros(std::max({in + 1, rpad, nf}), 0.f);
    const E zero_row[kNR] = {};
    E scratch_row[kNR] = {};
    std::vector<float> xbuf(shrink && (!dot || want_dB) && (!kF32 || mask_x) ? tb * in : 0);
    std::vector<float> u(tb * us, 0.f);
    std::vector<float> xfbuf(want_dA && (!kF32 || mask_xf) ? tb * nf : 0);
    std::vector<float> ufbuf(want_dB ? tb * us : 0, 0.f);
    float tile[kMR][kNR], row32[kNR];
    const float* rows[kMR];
    const E* src[kMR];
    E* dst[kMR];
    const float* brows[kTB];
    const float* xrows[kTB];
    const uint16_t* xrows16[kTB];
    // dst = fp32(keep ⊙ row t of a [T, width] tensor) (the mask index is t * width + k)
    auto load_row = [&](const T* src, int64_t t, int64_t width, bool mask, float* dst) {
      widen_row(bits_of(src), width, dst);
      if (!mask) return;
      const uint64_t base = static_cast<uint64_t>(t) * width;
      for (int64_t k = 0; k < width; ++k) dst[k] *= drop.factor(base + k);
    };
    // chunk c holds blocks [c * nblk / nchunk, (c + 1) * nblk / nchunk)
    for (int64_t blk = c0 * nblk / nchunk, c = c0; blk < c1 * nblk / nchunk; ++blk) {
      const int64_t t0 = blk * tb, nt = std::min(tb, j.T - t0);
      while ((c + 1) * nblk / nchunk <= blk) ++c;
      float* part = partials.get() + c * gsize;
      if (shrink) {
        // Left-operand rows: bf16 read in place by the dot-product shrink; fp32 read in place
        // when unmasked, else converted/masked into xbuf (also for dB's fp32 rows after a dot shrink)
        if (!xbuf.empty())
          for (int64_t i = 0; i < nt; ++i) load_row(x + (t0 + i) * j.ldx, t0 + i, in, mask_x, xbuf.data() + i * in);
        for (int64_t i = 0; i < nt; ++i) {
          xrows16[i] = reinterpret_cast<const uint16_t*>(x + (t0 + i) * j.ldx);
          xrows[i] = xbuf.empty() ? reinterpret_cast<const float*>(x + (t0 + i) * j.ldx) : xbuf.data() + i * in;
        }
        std::fill(u.begin(), u.end(), 0.f);
        if (dot) {
          shrink_block_bf16(nt, in, rp, xrows16, Apk2.data(), u.data(), us,
                            reinterpret_cast<const uint16_t*>(zeros.data()));
        } else {
          shrink_block(nt, in, rp, xrows, Apk.data(), u.data(), us, zeros.data());
        }
        if (j.u)
          for (int64_t i = 0; i < nt; ++i)
            std::copy(u.data() + i * us, u.data() + i * us + r, j.u + (t0 + i) * r);
        if (want_dB) {  // dBt += uf^T x, while this block of x is in cache
          for (int64_t i = 0; i < nt; ++i) {
            std::copy(j.uf + (t0 + i) * r, j.uf + (t0 + i + 1) * r, ufbuf.data() + i * us);
            brows[i] = xrows[i];
          }
          tn_update(nt, ufbuf.data(), us, r, brows, in, part + (want_dA ? r * nf : 0));
        }
      } else {
        for (int64_t i = 0; i < nt; ++i)
          std::copy(j.u + (t0 + i) * r, j.u + (t0 + i + 1) * r, u.data() + i * us);
      }
      if (want_dA) {  // dA += u^T (keep ⊙ xf)
        const T* xf = static_cast<const T*>(j.xf);
        for (int64_t i = 0; i < nt; ++i) {
          const T* src = xf + (t0 + i) * j.ldxf;
          if (xfbuf.empty()) {
            brows[i] = reinterpret_cast<const float*>(src);
          } else {
            load_row(src, t0 + i, nf, mask_xf, xfbuf.data() + i * nf);
            brows[i] = xfbuf.data() + i * nf;
          }
        }
        tn_update(nt, u.data(), us, r, brows, nf, part);
      }
      if (!expand) continue;
      // Expand: y = src + s * u B^T rounded once into T in the micro-kernel's epilogue, src being
      // y itself, or the bias / zeros with overwrite_y (y then written without being read). 6 rows
      // at a time, left to right: 6 sequential streams through y; B panels stay in cache.
      E* yb = reinterpret_cast<E*>(y);
      for (int64_t g = 0; g < nt; g += kMR) {
        for (int m = 0; m < kMR; ++m) rows[m] = g + m < nt ? u.data() + (g + m) * us : zeros.data();
        for (int64_t p = 0; p < op; ++p) {
          const int64_t o0 = p * kNR, nc = std::min<int64_t>(kNR, out - o0);
          const float* panel = Bpk.data() + p * r * kNR;
          for (int m = 0; m < kMR; ++m) {
            dst[m] = g + m < nt ? yb + (t0 + g + m) * j.ldy + o0 : scratch_row;
            src[m] = !j.overwrite_y || g + m >= nt ? dst[m] : bias ? bits_of(bias) + o0 : zero_row;
          }
          if (nc == kNR && !mask_y) {
            micro_6x16_acc(r, rows, panel, src, dst, j.scale);
            continue;
          }
          micro_6x16(r, rows, panel, tile);  // a partial last panel, or masked: through fp32 rows
          for (int m = 0; m < kMR && g + m < nt; ++m) {
            const uint64_t base = static_cast<uint64_t>(t0 + g + m) * out + o0;
            widen_row(src[m], nc, row32);
            for (int64_t c = 0; c < nc; ++c)
              row32[c] += j.scale * (mask_y ? drop.factor(base + c) : 1.f) * tile[m][c];
            narrow_row(row32, nc, dst[m]);
          }
        }
      }
    }
  });
  if (!grads) return;
  // Sum the chunk partials in chunk order into dA, dBt: per run of kSumRun elements, chunk by
  // chunk (sequential, vectorized), each element's sum in the order c = 0, 1, ...
  constexpr int64_t kSumRun = 512;
  at::parallel_for(0, ceil_div(gsize, kSumRun), 8, [&](int64_t b0, int64_t b1) {
    float acc[kSumRun];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kSumRun, n = std::min(kSumRun, gsize - e0);
      std::fill(acc, acc + n, 0.f);
      for (int64_t c = 0; c < nchunk; ++c) {
        const float* p = partials.get() + c * gsize + e0;
        for (int64_t i = 0; i < n; ++i) acc[i] += p[i];
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = e0 + i;
        if (want_dA && e < r * nf) {
          j.dA[e] = acc[i];
        } else {
          j.dBt[e - (want_dA ? r * nf : 0)] = acc[i];
        }
      }
    }
  });
}

}  // namespace

void lowrank_cpu(DType dt, const LowRankJob& job) {
  if (job.T == 0) return;
  const bool masked = job.dropout_p > 0.f && (job.mask_x || job.mask_y);
  dispatch_dtype<float, c10::Half, c10::BFloat16>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (job.T <= kSmallT && !masked && job.dA == nullptr && job.dBt == nullptr) {
      run_small<T>(job);
    } else {
      run<T>(job);
    }
  });
}

}  // namespace lora_ext::cpu
