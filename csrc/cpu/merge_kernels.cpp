// remerge_'s per-element step on a row piece of <= 16 elements, and merge_'s 6 x 16 tile, on
// AVX-512 (merge_kernels.h).
//
// AVX-512 form: each step of merge_math's scalar code (rec, merged, transition) is one 16-lane
// operation on 32-bit lanes (16-bit formats zero-extended), so every lane gives the scalar bits:
// decoders bf16 << 16, fp16 vcvtph2ps (exact); encoders bf16 integer round-to-nearest-even, fp16
// vcvtps2ph (IEEE round to nearest even, as the integer encoder), every NaN -> F::kNaN; the same
// float operations in the same order (TwoSum, the comparisons). NaN inputs may decode to other
// NaN bits than the scalar decoder's, but those lanes are never used (a NaN W element is its own
// W0) and a NaN only meets ordered comparisons (false either way). Keys, the monotone integer
// order, fit 32-bit lanes: |key| <= 0x7FC00000 + 8 for every pattern reached. A piece's codes are
// k * 16 <= 64 bits: one 64-bit word, spread over lanes with variable shifts.
// merge_'s tile: S = L R in 6 zmm accumulators (one per row: a 16-float load of R's panel and 6
// broadcasts of L per rank step, the fma chain of merge_math), folded into W with merged().
#include "merge_kernels.h"

#include <cstring>

#include "../merge_math.h"
#include "lowrank_microkernel.h"  // the kernel set picked, LORA_EXT_CLONES
#include "vec16.h"                // immintrin.h (GCC 12 warning silenced)

#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_EXT_MERGE_VEC 1
#endif

namespace lora_ext::cpu::merge_kernels {
namespace {

namespace mm = lora_ext::merge_math;

// bits (the piece's n * k code bits, element 0 lowest) OR-ed into codes at bit position bit.
// A word the piece covers whole is touched by no other piece (plain OR); the words at its ends
// may hold codes of pieces other threads write (atomic OR).
void or_codes(uint32_t* codes, int64_t bit, int nbits, uint64_t bits) {
  const int64_t w = bit >> 5, last = (bit + nbits - 1) >> 5;
  const int off = static_cast<int>(bit & 31);
  const uint32_t parts[3] = {static_cast<uint32_t>(bits << off),
                             static_cast<uint32_t>((bits << off) >> 32),
                             off ? static_cast<uint32_t>(bits >> (64 - off)) : 0u};
  for (int64_t i = w; i <= last; ++i) {
    const uint32_t p = parts[i - w];
    const bool whole = (i << 5) >= bit && ((i + 1) << 5) <= bit + nbits;
    if (whole)
      codes[i] |= p;
    else
      atomic_or(codes + i, p);
  }
}

// The nbits <= 64 code bits at bit position bit (never reads past the last word they use).
uint64_t read_bits(const uint32_t* codes, int64_t bit, int nbits) {
  const int64_t w = bit >> 5, last = (bit + nbits - 1) >> 5;
  const int off = static_cast<int>(bit & 31);
  uint64_t lo = codes[w];
  if (last >= w + 1) lo |= static_cast<uint64_t>(codes[w + 1]) << 32;
  uint64_t out = lo >> off;
  if (last >= w + 2) out |= static_cast<uint64_t>(codes[w + 2]) << (64 - off);  // off > 0 here
  return nbits == 64 ? out : out & ((uint64_t{1} << nbits) - 1);
}

// The elements one at a time: merge_math's scalar code (other CPUs, other kernel sets).
template <class F, class R>
uint32_t transition_piece_scalar(R* w, int n, int64_t e0, const float* so, const float* sn,
                                 uint32_t* codes, int k, bool has_old, bool has_new) {
  uint32_t fail = 0;
  uint64_t init_bits = 0;
  for (int c = 0; c < n; ++c) {
    uint32_t v = w[c], code;
    if (!has_old) {
      code = mm::code_of<F>(v, k);
      init_bits |= static_cast<uint64_t>(code) << (c * k);
    } else {
      code = mm::read_code(codes, e0 + c, k);
    }
    if (!mm::transition<F>(v, has_old ? so[c] : 0.f, has_new ? sn[c] : 0.f, code, k, has_old, has_new))
      fail |= 1u << c;
    w[c] = static_cast<R>(v);
  }
  if (!has_old && k > 0) or_codes(codes, e0 * k, n * k, init_bits);
  return fail;
}

#ifdef LORA_EXT_MERGE_VEC
#define LORA_EXT_V inline __attribute__((target("avx512f,avx2,fma,f16c"), always_inline))
#define LORA_EXT_VF __attribute__((target("avx512f,avx2,fma,f16c")))

using V = __m512i;

template <class F>
LORA_EXT_V __mmask16 is_nan(V w) {
  constexpr uint32_t abs = F::kBits == 32 ? 0x7FFFFFFFu : 0x7FFFu;
  constexpr uint32_t inf = F::kBits == 32 ? 0x7F800000u : F::kNaN == 0x7E00u ? 0x7C00u : 0x7F80u;
  return _mm512_cmpgt_epu32_mask(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(abs))),
                                 _mm512_set1_epi32(static_cast<int>(inf)));
}

template <class F>
LORA_EXT_V __m512 decode(V b) {
  if constexpr (F::kBits == 32) {
    return _mm512_castsi512_ps(b);
  } else if constexpr (F::kNaN == 0x7E00u) {
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(b));
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
  }
}

template <class F>
LORA_EXT_V V encode(__m512 f) {
  V r;
  if constexpr (F::kBits == 32) {
    r = _mm512_castps_si512(f);
  } else if constexpr (F::kNaN == 0x7E00u) {
    r = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const V x = _mm512_castps_si512(f);
    const V lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  }
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                               _mm512_set1_epi32(static_cast<int>(F::kNaN)));
}

// key(b) = b's sign ? -mag - 1 (= ~mag) : mag
template <class F>
LORA_EXT_V V key(V b) {
  constexpr uint32_t sign = 1u << (F::kBits - 1);
  const V mag = _mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(sign - 1u)));
  const __mmask16 neg = _mm512_test_epi32_mask(b, _mm512_set1_epi32(static_cast<int>(sign)));
  return _mm512_mask_xor_epi32(mag, neg, mag, _mm512_set1_epi32(-1));
}

template <class F>
LORA_EXT_V V from_key(V k) {
  constexpr uint32_t sign = 1u << (F::kBits - 1);
  constexpr uint32_t all = F::kBits == 32 ? 0xFFFFFFFFu : ((1u << F::kBits) - 1u);
  const __mmask16 neg = _mm512_cmplt_epi32_mask(k, _mm512_setzero_si512());
  const V b = _mm512_mask_xor_epi32(k, neg, k, _mm512_set1_epi32(static_cast<int>(~sign)));
  return _mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(all)));
}

template <class F>
LORA_EXT_V V rec(V w, __m512 s, V code, int k) {
  const __m512 wf = decode<F>(w);
  const __m512 t = _mm512_sub_ps(wf, s);
  const __m512 bv = _mm512_sub_ps(t, wf), av = _mm512_sub_ps(t, bv);
  const __m512 neg_s = _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(s), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  const __m512 err = _mm512_add_ps(_mm512_sub_ps(wf, av), _mm512_sub_ps(neg_s, bv));
  V r = encode<F>(t);
  if (k > 0) {
    const __m512 xf = decode<F>(r);
    const __mmask16 up =
        _mm512_cmp_ps_mask(t, xf, _CMP_GT_OQ) |
        (_mm512_cmp_ps_mask(t, xf, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(err, _mm512_setzero_ps(), _CMP_GT_OQ));
    V base = _mm512_sub_epi32(key<F>(r), _mm512_set1_epi32(1 << (k - 1)));
    base = _mm512_mask_add_epi32(base, up, base, _mm512_set1_epi32(1));
    const V off = _mm512_and_si512(_mm512_sub_epi32(code, base), _mm512_set1_epi32((1 << k) - 1));
    r = from_key<F>(_mm512_add_epi32(base, off));
  }
  return _mm512_mask_mov_epi32(r, is_nan<F>(w), w);
}

template <class F>
LORA_EXT_V V merged(V w0, __m512 s) {
  return _mm512_mask_mov_epi32(encode<F>(_mm512_add_ps(decode<F>(w0), s)), is_nan<F>(w0), w0);
}

// Lane i: (bits >> i k) & (2^k - 1). (i k < 64: the 32-bit products are the 64-bit ones.)
LORA_EXT_V V spread(uint64_t bits, int k) {
  const V c = _mm512_set1_epi64(static_cast<long long>(bits));
  const V i = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), kk = _mm512_set1_epi64(k);
  const V lo = _mm512_srlv_epi64(c, _mm512_mullo_epi32(i, kk));
  const V hi = _mm512_srlv_epi64(c, _mm512_mullo_epi32(_mm512_add_epi64(i, _mm512_set1_epi64(8)), kk));
  const V v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                 _mm512_cvtepi64_epi32(hi), 1);
  return _mm512_and_si512(v, _mm512_set1_epi32((1 << k) - 1));
}

// The inverse: OR over lanes of (lane i) << i k (lanes hold k-bit values).
LORA_EXT_V uint64_t gather_bits(V codes, int k) {
  const V i = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), kk = _mm512_set1_epi64(k);
  const V lo = _mm512_sllv_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(codes)),
                                 _mm512_mullo_epi32(i, kk));
  const V hi = _mm512_sllv_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(codes, 1)),
                                 _mm512_mullo_epi32(_mm512_add_epi64(i, _mm512_set1_epi64(8)), kk));
  return static_cast<uint64_t>(_mm512_reduce_or_epi64(_mm512_or_si512(lo, hi)));
}

template <class F, class R>
LORA_EXT_VF uint32_t piece_avx512(R* w, int n, int64_t e0, const float* so, const float* sn,
                                  uint32_t* codes, int k, bool has_old, bool has_new) {
  const __mmask16 live = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
  R tmp[16] = {};
  V v;
  if constexpr (sizeof(R) == 4) {
    v = _mm512_maskz_loadu_epi32(live, w);
  } else {
    const R* src = w;
    if (n < 16) {
      std::memcpy(tmp, w, n * sizeof(R));
      src = tmp;
    }
    v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
  V code = _mm512_setzero_si512();
  if (k > 0 && !has_old) {  // first merge: the low k bits of key(W0)
    code = _mm512_maskz_and_epi32(live, key<F>(v), _mm512_set1_epi32((1 << k) - 1));
    or_codes(codes, e0 * k, n * k, gather_bits(code, k));
  } else if (k > 0) {
    code = spread(read_bits(codes, e0 * k, n * k), k);
  }
  const V w0 = has_old ? rec<F>(v, _mm512_loadu_ps(so), code, k) : v;
  V out = w0;
  __mmask16 fail = 0;
  if (has_new) {
    const __m512 s = _mm512_loadu_ps(sn);
    const V wn = merged<F>(w0, s);
    const __mmask16 ok = _mm512_cmpeq_epi32_mask(rec<F>(wn, s, code, k), w0);
    out = _mm512_mask_mov_epi32(w0, ok, wn);
    fail = static_cast<__mmask16>(~ok & live);
  }
  if constexpr (sizeof(R) == 4) {
    _mm512_mask_storeu_epi32(w, live, out);
  } else if (n == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w), _mm512_cvtepi32_epi16(out));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp), _mm512_cvtepi32_epi16(out));
    std::memcpy(w, tmp, n * sizeof(R));
  }
  return fail;
}

// The 6 x 16 delta tile S = L R in 6 zmm accumulators (R rows of stride ldr).
struct Acc6 {
  __m512 a[6];
};
LORA_EXT_V Acc6 acc6(const float* L, int64_t Rt, const float* R, int64_t ldr) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  for (int64_t j = 0; j < Rt; ++j) {
    const __m512 r = _mm512_loadu_ps(R + j * ldr);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(L[j]), r, a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(L[Rt + j]), r, a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(L[2 * Rt + j]), r, a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(L[3 * Rt + j]), r, a3);
    a4 = _mm512_fmadd_ps(_mm512_set1_ps(L[4 * Rt + j]), r, a4);
    a5 = _mm512_fmadd_ps(_mm512_set1_ps(L[5 * Rt + j]), r, a5);
  }
  return Acc6{{a0, a1, a2, a3, a4, a5}};
}

template <class F, class R>
LORA_EXT_VF void tile_avx512(R* W, int64_t ld, const float* L, int64_t Rt, const float* Rp) {
  const Acc6 c = acc6(L, Rt, Rp, 16);
  const __m512* acc = c.a;
  for (int m = 0; m < 6; ++m) {
    R* row = W + m * ld;
    if constexpr (sizeof(R) == 4) {
      _mm512_storeu_si512(row, merged<F>(_mm512_loadu_si512(row), acc[m]));
    } else {
      const V w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), _mm512_cvtepi32_epi16(merged<F>(w, acc[m])));
    }
  }
}
#endif

}  // namespace

bool available() {
#ifdef LORA_EXT_MERGE_VEC
  return avx512_kernels();
#else
  return false;
#endif
}

bool avx2_tiles() { return f16c_conversions(); }

LORA_EXT_CLONES float fma_chain(const float* l, const float* r, int64_t ldr, int64_t Rt) {
  float s = 0.f;
  for (int64_t j = 0; j < Rt; ++j) s = mm::fma_rn(l[j], r[j * ldr], s);
  return s;
}

template <class F, class R>
uint32_t transition_piece(R* w, int n, int64_t e0, const float* so, const float* sn,
                          uint32_t* codes, int k, bool has_old, bool has_new) {
#ifdef LORA_EXT_MERGE_VEC
  if (available()) return piece_avx512<F>(w, n, e0, so, sn, codes, k, has_old, has_new);
#endif
  return transition_piece_scalar<F>(w, n, e0, so, sn, codes, k, has_old, has_new);
}

#ifdef LORA_EXT_MERGE_VEC
LORA_EXT_VF void s_tile_avx512(const float* L, int64_t Rt, const float* R, int64_t ldr,
                               float S[kTileRows][kTileCols]) {
  const Acc6 c = acc6(L, Rt, R, ldr);
  for (int m = 0; m < 6; ++m) _mm512_storeu_ps(S[m], c.a[m]);
}

template <class F, class R>
void merge_tile(R* W, int64_t ld, const float* L, int64_t Rt, const float* Rp) {
  tile_avx512<F>(W, ld, L, Rt, Rp);
}
template void merge_tile<mm::F32, uint32_t>(uint32_t*, int64_t, const float*, int64_t, const float*);
template void merge_tile<mm::F16, uint16_t>(uint16_t*, int64_t, const float*, int64_t, const float*);
template void merge_tile<mm::BF16, uint16_t>(uint16_t*, int64_t, const float*, int64_t, const float*);
#endif

#define LORA_EXT_PIECE(F, R)                                                              \
  template uint32_t transition_piece<F, R>(R*, int, int64_t, const float*, const float*,  \
                                           uint32_t*, int, bool, bool);
LORA_EXT_PIECE(mm::F32, uint32_t)
LORA_EXT_PIECE(mm::F16, uint16_t)
LORA_EXT_PIECE(mm::BF16, uint16_t)
#undef LORA_EXT_PIECE

}  // namespace lora_ext::cpu::merge_kernels
