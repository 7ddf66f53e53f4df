// CPU kernels of merge_, remerge_ and merge_points_ (element math: ../merge_math.h).
//
// Tiling: the weight [P, Q] is cut into row blocks of kMR = 6 rows, split across threads
// (at::parallel_for). For each 6 x 16 tile the fp32 delta S = L R is computed in registers
// by an explicit fma chain over the rank (AVX2+FMA: 12 accumulators, 2 loads of R and 6
// broadcasts of L per rank step; elsewhere a portable __builtin_fmaf loop with the same
// per-element order, so every path gives the same bits as the CUDA kernel). merge_ folds a
// whole tile into W straight from the registers (8-wide fp32 adds, F16C / integer rounding
// for fp16 / bf16); edge tiles go through the scalar merge_math code. W is read once and
// written once, L (6 x Rt) stays in L1 and R (fp32, packed in 16-wide column panels so each
// tile reads one contiguous Rt x 16 block) in L2; no full-size temporaries.
// remerge_ computes the tiles of the old and of the new adapter set and runs the
// per-element transition on each 16-element row piece (merge_kernels.cpp: AVX-512, 16 lanes at a
// time); failures (rare) are OR-ed into their bit array with an atomic OR.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "../merge_glue.h"
#include "../merge_math.h"
#include "merge_kernels.h"
#include "ops_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LORA_EXT_MERGE_AVX2 1
#endif

namespace lora_ext::cpu {

namespace {

namespace mm = lora_ext::merge_math;

constexpr int kMR = 6;   // rows per tile
constexpr int kNC = 16;  // columns per tile (R is padded to a multiple)

template <class F>
using Raw = std::conditional_t<F::kBits == 32, uint32_t, uint16_t>;

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
#define LORA_EXT_AVX2 __attribute__((target("avx2,fma,f16c")))

// The 6 x 16 tile in 12 registers (named, so they never live on the stack).
struct Acc {
  __m256 a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5;
};

LORA_EXT_AVX2 inline Acc s_acc_avx2(const float* L, int64_t Rt, const float* R, int64_t ldr) {
  Acc c;
  c.a0 = c.b0 = c.a1 = c.b1 = c.a2 = c.b2 = c.a3 = c.b3 = c.a4 = c.b4 = c.a5 = c.b5 =
      _mm256_setzero_ps();
  const float *l0 = L, *l1 = L + Rt, *l2 = L + 2 * Rt, *l3 = L + 3 * Rt, *l4 = L + 4 * Rt,
              *l5 = L + 5 * Rt;
  for (int64_t j = 0; j < Rt; ++j) {
    const __m256 r0 = _mm256_loadu_ps(R + j * ldr), r1 = _mm256_loadu_ps(R + j * ldr + 8);
#define LORA_EXT_ROW(m)                              \
  {                                                  \
    const __m256 l = _mm256_broadcast_ss(l##m + j);  \
    c.a##m = _mm256_fmadd_ps(l, r0, c.a##m);         \
    c.b##m = _mm256_fmadd_ps(l, r1, c.b##m);         \
  }
    LORA_EXT_ROW(0) LORA_EXT_ROW(1) LORA_EXT_ROW(2) LORA_EXT_ROW(3) LORA_EXT_ROW(4) LORA_EXT_ROW(5)
#undef LORA_EXT_ROW
  }
  return c;
}

LORA_EXT_AVX2 void s_tile_avx2(const float* L, int64_t Rt, const float* R, int64_t ldr,
                               float S[kMR][kNC]) {
  const Acc c = s_acc_avx2(L, Rt, R, ldr);
  const __m256 v[kMR][2] = {{c.a0, c.b0}, {c.a1, c.b1}, {c.a2, c.b2},
                            {c.a3, c.b3}, {c.a4, c.b4}, {c.a5, c.b5}};
  for (int m = 0; m < kMR; ++m) {
    _mm256_storeu_ps(S[m], v[m][0]);
    _mm256_storeu_ps(S[m] + 8, v[m][1]);
  }
}

// w[0:8] = merged(w, s): the same bits as merge_math's scalar merged() (F16C and the bf16
// integer rounding round to nearest even; a NaN w stays, a NaN sum becomes F::kNaN).
LORA_EXT_AVX2 inline __m256 unord(__m256 v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }
// 8 x 32-bit lane masks -> 8 x 16-bit lane masks.
LORA_EXT_AVX2 inline __m128i mask16(__m256 m) {
  const __m256i i = _mm256_castps_si256(m);
  return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
}

template <class F>
LORA_EXT_AVX2 inline void add8(void* w, __m256 s) {
  if constexpr (F::kBits == 32) {
    float* p = static_cast<float*>(w);
    const __m256 w0 = _mm256_loadu_ps(p), v = _mm256_add_ps(w0, s);
    const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(F::kNaN)));
    _mm256_storeu_ps(p, _mm256_blendv_ps(_mm256_blendv_ps(v, nan, unord(v)), w0, unord(w0)));
  } else if constexpr (std::is_same_v<F, merge_math::F16>) {
    __m128i* p = static_cast<__m128i*>(w);
    const __m128i raw = _mm_loadu_si128(p);
    const __m256 w0 = _mm256_cvtph_ps(raw), v = _mm256_add_ps(w0, s);
    __m128i y = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y = _mm_blendv_epi8(y, _mm_set1_epi16(static_cast<short>(F::kNaN)), mask16(unord(v)));
    _mm_storeu_si128(p, _mm_blendv_epi8(y, raw, mask16(unord(w0))));
  } else {
    __m128i* p = static_cast<__m128i*>(w);
    const __m256i in = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16);
    const __m256 w0 = _mm256_castsi256_ps(in), v = _mm256_add_ps(w0, s);
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i y = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(static_cast<int>(F::kNaN)),
                                   _mm256_castps_si256(unord(v)));
    y = _mm256_blendv_epi8(y, _mm256_srli_epi32(in, 16), _mm256_castps_si256(unord(w0)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(y, y), 0x08);
    _mm_storeu_si128(p, _mm256_castsi256_si128(packed));
  }
}

// A whole 6 x 16 tile of merge_: S in registers, folded into the 6 rows of W.
template <class F>
LORA_EXT_AVX2 void merge_tile_avx2(Raw<F>* W, int64_t ld, const float* L, int64_t Rt,
                                   const float* R, int64_t ldr) {
  const Acc c = s_acc_avx2(L, Rt, R, ldr);
  add8<F>(W, c.a0), add8<F>(W + 8, c.b0);
  add8<F>(W + ld, c.a1), add8<F>(W + ld + 8, c.b1);
  add8<F>(W + 2 * ld, c.a2), add8<F>(W + 2 * ld + 8, c.b2);
  add8<F>(W + 3 * ld, c.a3), add8<F>(W + 3 * ld + 8, c.b3);
  add8<F>(W + 4 * ld, c.a4), add8<F>(W + 4 * ld + 8, c.b4);
  add8<F>(W + 5 * ld, c.a5), add8<F>(W + 5 * ld + 8, c.b5);
}

#endif

using merge_kernels::STile;
static_assert(kMR == merge_kernels::kTileRows && kNC == merge_kernels::kTileCols);

STile s_tile_fn() { return merge_kernels::s_tile(); }


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
  const int64_t Rt = o.Rt;
  const float* L = o.L.data_ptr<float>();
  const float* Rm = o.R.data_ptr<float>();  // panels [Qpad / 16][Rt][16]
  const STile tile = s_tile_fn();
#ifdef LORA_EXT_MERGE_AVX2
  const bool vec512 = merge_kernels::available(), fast = merge_kernels::avx2_tiles();
#endif
  for_row_blocks(P, Q, Rt, [&](int64_t p0, int64_t rows) {
    float S[kMR][kNC];
    for (int64_t q0 = 0; q0 < Q; q0 += kNC) {
      const int64_t nc = std::min<int64_t>(kNC, Q - q0);
#ifdef LORA_EXT_MERGE_AVX2
      if (vec512 && rows == kMR && nc == kNC) {
        merge_kernels::merge_tile<F>(W + p0 * ld + q0, ld, L + p0 * Rt, Rt, Rm + q0 * Rt);
        continue;
      }
      if (fast && rows == kMR && nc == kNC) {
        merge_tile_avx2<F>(W + p0 * ld + q0, ld, L + p0 * Rt, Rt, Rm + q0 * Rt, kNC);
        continue;
      }
#endif
      tile(L + p0 * Rt, Rt, Rm + q0 * Rt, kNC, S);
      for (int64_t m = 0; m < rows; ++m) {
        R* row = W + (p0 + m) * ld + q0;
        for (int64_t c = 0; c < nc; ++c)
          row[c] = static_cast<R>(mm::merged<F>(row[c], S[m][c], true));
      }
    }
  });
}

template <class F>
void remerge_impl(void* w, int64_t P, int64_t Q, uint32_t* codes, uint32_t* fails, int k,
                  const MergeOperands& old_op, const MergeOperands& new_op) {
  using R = Raw<F>;
  R* W = static_cast<R*>(w);
  const bool has_old = old_op.Rt > 0, has_new = new_op.Rt > 0;
  const STile tile = s_tile_fn();
  const int64_t Rt = std::max(old_op.Rt, new_op.Rt);
  for_row_blocks(P, Q, 2 * Rt, [&](int64_t p0, int64_t rows) {
    float So[kMR][kNC] = {}, Sn[kMR][kNC] = {};
    for (int64_t q0 = 0; q0 < Q; q0 += kNC) {
      if (has_old)
        tile(old_op.L.data_ptr<float>() + p0 * old_op.Rt, old_op.Rt,
             old_op.R.data_ptr<float>() + q0 * old_op.Rt, kNC, So);
      if (has_new)
        tile(new_op.L.data_ptr<float>() + p0 * new_op.Rt, new_op.Rt,
             new_op.R.data_ptr<float>() + q0 * new_op.Rt, kNC, Sn);
      const int nc = static_cast<int>(std::min<int64_t>(kNC, Q - q0));
      for (int64_t m = 0; m < rows; ++m) {
        const int64_t e0 = (p0 + m) * Q + q0;
        const uint64_t f = merge_kernels::transition_piece<F>(W + e0, nc, e0, So[m], Sn[m], codes, k,
                                                          has_old, has_new);
        if (f) {  // rare: the elements the codes cannot restore
          const uint64_t at = f << (e0 & 31);
          merge_kernels::atomic_or(fails + (e0 >> 5), static_cast<uint32_t>(at));
          merge_kernels::atomic_or(fails + (e0 >> 5) + 1, static_cast<uint32_t>(at >> 32));
        }
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
      const float s = merge_kernels::fma_chain(L + p * Rt, Rm + q, ldr, Rt);
      W[e] = static_cast<R>(mm::merged<F>(V[t], s, Rt > 0));
    }
  });
}

template <class Fn>
void dispatch_format(DType dt, Fn&& fn) {
  dispatch_dtype<mm::F32, mm::F16, mm::BF16>(dt, [&](auto tag) { fn(typename decltype(tag)::type{}); });
}

}  // namespace

merge_kernels::STile merge_kernels::s_tile() {
#ifdef LORA_EXT_MERGE_AVX2
  if (available()) return s_tile_avx512;
  return avx2_tiles() ? s_tile_avx2 : s_tile_portable;
#else
  return s_tile_portable;
#endif
}

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
      merge_operands(op, weight, fan_in_fan_out, v.transposed, A, B, scales, kMR, kNC, kNC);
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
      merge_operands(op, weight, fan_in_fan_out, false, A_old, B_old, s_old, kMR, kNC, kNC);
  const MergeOperands n =
      merge_operands(op, weight, fan_in_fan_out, false, A_new, B_new, s_new, kMR, kNC, kNC);
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
  check_points(op, weight, idx, vals, /*check_range=*/true);
  TORCH_CHECK(weight.device().is_cpu(), op, ": CPU kernel called with weight on ", weight.device());
  const MergeOperands o = merge_operands(op, weight, fan_in_fan_out, false, A, B, scales, 1, 1);
  if (idx.numel() == 0) return;
  const at::Tensor i = idx.contiguous(), v = vals.contiguous();
  dispatch_format(to_dtype(weight, op, "weight"), [&](auto f) {
    points_impl<decltype(f)>(weight.data_ptr(), weight.size(1), i.data_ptr<int64_t>(),
                             v.data_ptr(), i.numel(), o);
  });
}

at::Tensor merge_code_failures_cpu(const at::Tensor& w0, const at::Tensor& s) {
  const char* op = "merge_code_failures";
  check_code_failures(op, w0, s);
  const at::Tensor w = w0.contiguous(), sc = s.contiguous();
  at::Tensor out = at::zeros({4}, w0.options().dtype(at::kLong));
  int64_t* cnt = out.data_ptr<int64_t>();
  const float* sp = sc.data_ptr<float>();
  dispatch_format(to_dtype(w0, op, "w0"), [&](auto f) {
    using F = decltype(f);
    const Raw<F>* wp = static_cast<const Raw<F>*>(w.data_ptr());
    for (int64_t i = 0; i < w.numel(); ++i)
      for (int c = 0; c < 4; ++c) cnt[c] += !mm::code_restores<F>(wp[i], sp[i], mm::code_width(c));
  });
  return out;
}

}  // namespace lora_ext::cpu
