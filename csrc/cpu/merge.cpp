// CPU kernels of merge_, remerge_ and merge_points_ (element math: ../merge_math.h).
//
// Tiling: the weight [P, Q] is cut into row blocks of kMR = 6 rows, split across threads
// (at::parallel_for). For each 6 x 16 tile the fp32 delta S = L R is computed in registers
// by an explicit fma chain over the rank (AVX2+FMA: 12 accumulators, 2 loads of R and 6
// broadcasts of L per rank step; elsewhere a portable __builtin_fmaf loop with the same
// per-element order, so every path gives the same bits as the CUDA kernel). The tile is
// then folded into W in one read-modify-write of its rows: W is read once and written
// once, L (6 x Rt) stays in L1 and R (Rt x Q, fp32) in L2; no full-size temporaries.
// remerge_ computes the tiles of the old and of the new adapter set and runs the
// per-element transition; first-merge codes are OR-ed into their words one word at a
// time, failures (rare) with an atomic OR.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "../merge_args.h"
#include "../merge_math.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LORA_EXT_MERGE_AVX2 1
#endif

namespace lora_ext::cpu {
namespace {

namespace mm = lora_ext::merge_math;

constexpr int kMR = 6;   // rows per tile
constexpr int kNC = 16;  // columns per tile (R is padded to a multiple)

// S[m][c] = fma chain over j < Rt of L[m * Rt + j] * R[j * ldr + c], from +0.
void s_tile_portable(const float* L, int64_t Rt, const float* R, int64_t ldr, float S[kMR][kNC]) {
  for (int m = 0; m < kMR; ++m)
    for (int c = 0; c < kNC; ++c) S[m][c] = 0.f;
  for (int64_t j = 0; j < Rt; ++j) {
    const float* r = R + j * ldr;
    for (int m = 0; m < kMR; ++m) {
      const float l = L[m * Rt + j];
      for (int c = 0; c < kNC; ++c) S[m][c] = __builtin_fmaf(l, r[c], S[m][c]);
    }
  }
}

#ifdef LORA_EXT_MERGE_AVX2
__attribute__((target("avx2,fma"))) void s_tile_avx2(const float* L, int64_t Rt, const float* R,
                                                       int64_t ldr, float S[kMR][kNC]) {
  __m256 c0[kMR], c1[kMR];
  for (int m = 0; m < kMR; ++m) c0[m] = c1[m] = _mm256_setzero_ps();
  for (int64_t j = 0; j < Rt; ++j) {
    const __m256 r0 = _mm256_loadu_ps(R + j * ldr), r1 = _mm256_loadu_ps(R + j * ldr + 8);
    for (int m = 0; m < kMR; ++m) {
      const __m256 l = _mm256_broadcast_ss(L + m * Rt + j);
      c0[m] = _mm256_fmadd_ps(l, r0, c0[m]);
      c1[m] = _mm256_fmadd_ps(l, r1, c1[m]);
    }
  }
  for (int m = 0; m < kMR; ++m) {
    _mm256_storeu_ps(S[m], c0[m]);
    _mm256_storeu_ps(S[m] + 8, c1[m]);
  }
}
#endif

using STile = void (*)(const float*, int64_t, const float*, int64_t, float[kMR][kNC]);

STile s_tile_fn() {
#ifdef LORA_EXT_MERGE_AVX2
  static const STile fn = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                              ? s_tile_avx2
                              : s_tile_portable;
  return fn;
#else
  return s_tile_portable;
#endif
}

template <class F>
using Raw = std::conditional_t<F::kBits == 32, uint32_t, uint16_t>;

// Runs body(p0, rows) for every block of kMR rows, in parallel.
template <class Body>
void for_row_blocks(int64_t P, int64_t Q, int64_t Rt, Body body) {
  const int64_t nblk = (P + kMR - 1) / kMR;
  // about 64K multiply-adds per task keeps small weights on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kMR * Q * (Rt + 1)));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) body(b * kMR, std::min<int64_t>(kMR, P - b * kMR));
  });
}

template <class F>
void merge_impl(void* w, int64_t P, int64_t Q, int64_t ld, const MergeOperands& o) {
  using R = Raw<F>;
  R* W = static_cast<R*>(w);
  const int64_t Rt = o.Rt, ldr = o.R.size(1);
  const float* L = o.L.data_ptr<float>();
  const float* Rm = o.R.data_ptr<float>();
  const STile tile = s_tile_fn();
  for_row_blocks(P, Q, Rt, [&](int64_t p0, int64_t rows) {
    float S[kMR][kNC];
    for (int64_t q0 = 0; q0 < Q; q0 += kNC) {
      tile(L + p0 * Rt, Rt, Rm + q0, ldr, S);
      const int64_t nc = std::min<int64_t>(kNC, Q - q0);
      for (int64_t m = 0; m < rows; ++m) {
        R* row = W + (p0 + m) * ld + q0;
        for (int64_t c = 0; c < nc; ++c)
          row[c] = static_cast<R>(mm::merged<F>(row[c], S[m][c], true));
      }
    }
  });
}

inline void atomic_or(uint32_t* word, uint32_t bits) {
  if (bits) __atomic_fetch_or(word, bits, __ATOMIC_RELAXED);
}

template <class F>
void remerge_impl(void* w, int64_t P, int64_t Q, uint32_t* codes, uint32_t* fails, int k,
                  const MergeOperands& old_op, const MergeOperands& new_op) {
  using R = Raw<F>;
  R* W = static_cast<R*>(w);
  const bool has_old = old_op.Rt > 0, has_new = new_op.Rt > 0, init = !has_old;
  const STile tile = s_tile_fn();
  const int64_t Rt = std::max(old_op.Rt, new_op.Rt);
  for_row_blocks(P, Q, 2 * Rt, [&](int64_t p0, int64_t rows) {
    float So[kMR][kNC] = {}, Sn[kMR][kNC] = {};
    for (int64_t q0 = 0; q0 < Q; q0 += kNC) {
      if (has_old)
        tile(old_op.L.data_ptr<float>() + p0 * old_op.Rt, old_op.Rt,
             old_op.R.data_ptr<float>() + q0, old_op.R.size(1), So);
      if (has_new)
        tile(new_op.L.data_ptr<float>() + p0 * new_op.Rt, new_op.Rt,
             new_op.R.data_ptr<float>() + q0, new_op.R.size(1), Sn);
      const int64_t nc = std::min<int64_t>(kNC, Q - q0);
      for (int64_t m = 0; m < rows; ++m) {
        const int64_t e0 = (p0 + m) * Q + q0;
        R* row = W + e0;
        int64_t word = -1;  // first-merge codes of this row piece, one word at a time
        uint32_t acc = 0;
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t e = e0 + c;
          uint32_t v = row[c];
          uint32_t code;
          if (init) {
            code = mm::code_of<F>(v, k);
            const int64_t bit = e * k;
            if (k > 0 && (bit >> 5) != word) {
              if (word >= 0) atomic_or(codes + word, acc);
              word = bit >> 5;
              acc = 0;
            }
            acc |= k > 0 ? code << (bit & 31) : 0u;
          } else {
            code = mm::read_code(codes, e, k);
          }
          if (!mm::transition<F>(v, So[m][c], Sn[m][c], code, k, has_old, has_new))
            atomic_or(fails + (e >> 5), 1u << (e & 31));
          row[c] = static_cast<R>(v);
        }
        if (word >= 0) atomic_or(codes + word, acc);
      }
    }
  });
}

template <class F>
void points_impl(void* w, int64_t Q, const int64_t* idx, const void* vals, int64_t n,
                 const MergeOperands& o) {
  using R = Raw<F>;
  R* W = static_cast<R*>(w);
  const R* V = static_cast<const R*>(vals);
  const int64_t Rt = o.Rt;
  const float* L = Rt ? o.L.data_ptr<float>() : nullptr;
  const float* Rm = Rt ? o.R.data_ptr<float>() : nullptr;
  const int64_t ldr = Rt ? o.R.size(1) : 0;
  at::parallel_for(0, n, 1024, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = idx[t], p = e / Q, q = e % Q;
      float s = 0.f;
      for (int64_t j = 0; j < Rt; ++j) s = mm::fma_rn(L[p * Rt + j], Rm[j * ldr + q], s);
      W[e] = static_cast<R>(mm::merged<F>(V[t], s, Rt > 0));
    }
  });
}

template <class Fn>
void dispatch_format(DType dt, Fn&& fn) {
  dispatch_dtype<mm::F32, mm::F16, mm::BF16>(dt, [&](auto tag) { fn(typename decltype(tag)::type{}); });
}

}  // namespace

void merge_cpu(at::Tensor weight, at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
               bool fan_in_fan_out) {
  const char* op = "merge_";
  WeightView v = weight_view(op, weight);
  TORCH_CHECK(weight.device().is_cpu(), op, ": CPU kernel called with weight on ", weight.device());
  const bool copy = !v.view.defined();
  at::Tensor work = copy ? weight.contiguous() : v.view;
  if (copy) {
    v.P = work.size(0);
    v.Q = work.size(1);
    v.ld = v.Q;
  }
  const MergeOperands o =
      merge_operands(op, weight, fan_in_fan_out, v.transposed, A, B, scales, kMR, kNC);
  if (o.Rt == 0 || weight.numel() == 0) return;
  dispatch_format(to_dtype(weight, op, "weight"),
                  [&](auto f) { merge_impl<decltype(f)>(work.data_ptr(), v.P, v.Q, v.ld, o); });
  if (copy) weight.copy_(work);
}

void remerge_cpu(at::Tensor weight, at::Tensor codes, at::Tensor fails, int64_t bits,
                 at::TensorList A_old, at::TensorList B_old, at::ArrayRef<double> s_old,
                 at::TensorList A_new, at::TensorList B_new, at::ArrayRef<double> s_new,
                 bool fan_in_fan_out) {
  const char* op = "remerge_";
  check_remerge(op, weight, codes, fails, bits);
  TORCH_CHECK(weight.device().is_cpu(), op, ": CPU kernel called with weight on ", weight.device());
  const MergeOperands o =
      merge_operands(op, weight, fan_in_fan_out, false, A_old, B_old, s_old, kMR, kNC);
  const MergeOperands n =
      merge_operands(op, weight, fan_in_fan_out, false, A_new, B_new, s_new, kMR, kNC);
  if ((o.Rt == 0 && n.Rt == 0) || weight.numel() == 0) return;
  auto* cw = reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>());
  auto* fw = reinterpret_cast<uint32_t*>(fails.data_ptr<int32_t>());
  dispatch_format(to_dtype(weight, op, "weight"), [&](auto f) {
    remerge_impl<decltype(f)>(weight.data_ptr(), weight.size(0), weight.size(1), cw, fw,
                              static_cast<int>(bits), o, n);
  });
}

void merge_points_cpu(at::Tensor weight, const at::Tensor& idx, const at::Tensor& vals,
                      at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                      bool fan_in_fan_out) {
  const char* op = "merge_points_";
  check_points(op, weight, idx, vals);
  TORCH_CHECK(weight.device().is_cpu(), op, ": CPU kernel called with weight on ", weight.device());
  const MergeOperands o = merge_operands(op, weight, fan_in_fan_out, false, A, B, scales, 1, 1);
  if (idx.numel() == 0) return;
  const at::Tensor i = idx.contiguous(), v = vals.contiguous();
  dispatch_format(to_dtype(weight, op, "weight"), [&](auto f) {
    points_impl<decltype(f)>(weight.data_ptr(), weight.size(1), i.data_ptr<int64_t>(),
                             v.data_ptr(), i.numel(), o);
  });
}

}  // namespace lora_ext::cpu
