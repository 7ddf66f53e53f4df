// Element arithmetic of merge / exact unmerge, shared bit for bit by the CPU and
// CUDA kernels (torch-free, host + device).
//
// Merged value. For a weight W0 and an ordered set of adapters, the kernels compute
//   S[p, q] = fma chain over the concatenated rank j of L[p, j] * R[j, q], from +0,
// where L/R are fp32 copies of B (pre-multiplied by its fp32 scale) and A (see
// merge_glue.h), and write W = enc(dec(W0) + S): one fp32 add, rounded once into
// W's dtype. Every step is a correctly rounded IEEE operation (explicit fma, one
// add, integer round-to-nearest-even encoders below), so the CPU and the GPU give
// the same bits and a later pass recomputes exactly the S of an earlier one.
//
// Exact unmerge. Rounding W0 + S loses information only where |S| pushes W into a
// coarser binade than W0 (or on exact ties): then several W0 map to one W. With
// key() the monotone integer order of the dtype's bit patterns, all W0 that give W
// form a short run of consecutive keys around t = W - S. We store, once at the first
// merge, the low `k` bits of key(W0) ("codes", k in {0, 1, 2, 4}); rec() picks the
// key with those low bits in a window of 2^k keys placed at round(t), on the side
// where the exact value t + err lies. Every write of a merged W runs rec() on the
// new value and compares with W0; where it would not give W0 back, the element
// becomes an exception (its W0 is kept exactly in a sparse list by the caller).
// So the invariant "rec(W, S_current, code) == W0 for every non-exception element"
// holds by construction after every merge/unmerge, in any order, for any count.
//
// NaN. CPUs keep a NaN operand's payload through an add, GPUs return their own canonical
// NaN, so NaN bits are defined here, not by the hardware: a NaN element of W0 is a fixed
// point (merged and restored bit for bit, payload and sign included), and a NaN produced by
// the merge (inf - inf, a NaN in A/B) is written as the format's canonical quiet NaN
// (kNaN: 0x7FC00000 / 0x7E00 / 0x7FC0). ±inf, ±0 and subnormals need no special case
// (IEEE adds without flush-to-zero on both sides).
#pragma once
#include <cstdint>
#include <cstring>

#include "dtype.h"  // LORA_EXT_HD

namespace lora_ext::merge_math {

// Element formats: raw bit patterns held in uint32_t.
struct F32 {
  static constexpr int kBits = 32;
  static constexpr uint32_t kNaN = 0x7FC00000u;
};
struct F16 {
  static constexpr int kBits = 16;
  static constexpr uint32_t kNaN = 0x7E00u;
};
struct BF16 {
  static constexpr int kBits = 16;
  static constexpr uint32_t kNaN = 0x7FC0u;
};

// Is the fp32 bit pattern b a NaN?
LORA_EXT_HD bool nan_bits(uint32_t b) { return (b & 0x7FFFFFFFu) > 0x7F800000u; }
// Is the element bit pattern w a NaN?
template <class F>
LORA_EXT_HD bool is_nan(uint32_t w) {
  if constexpr (F::kBits == 32) {
    return nan_bits(w);
  } else if constexpr (F::kNaN == 0x7E00u) {
    return (w & 0x7FFFu) > 0x7C00u;
  } else {
    return (w & 0x7FFFu) > 0x7F80u;
  }
}

LORA_EXT_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

LORA_EXT_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Correctly rounded a * b + c on both sides.
LORA_EXT_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// ---- decoders (exact) ----
LORA_EXT_HD float decode(F32, uint32_t b) { return bits_f32(b); }
LORA_EXT_HD float decode(BF16, uint32_t b) { return bits_f32(b << 16); }
LORA_EXT_HD float decode(F16, uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {  // zero or subnormal m * 2^-24: normalise with integers
    if (m == 0) return bits_f32(sign);
    int ee = 1;
    uint32_t mm = m;
    while ((mm & 0x400u) == 0) {
      mm <<= 1;
      --ee;
    }
    return bits_f32(sign | (static_cast<uint32_t>(ee + 112) << 23) | ((mm & 0x3FFu) << 13));
  }
  return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

// ---- encoders: round to nearest even, integer only; every NaN becomes kNaN ----
LORA_EXT_HD uint32_t encode(F32, float f) {
  const uint32_t x = f32_bits(f);
  return nan_bits(x) ? F32::kNaN : x;
}
LORA_EXT_HD uint32_t encode(BF16, float f) {
  const uint32_t x = f32_bits(f);
  if (nan_bits(x)) return BF16::kNaN;
  return (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
}
LORA_EXT_HD uint32_t encode(F16, float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return F16::kNaN;
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf (and inf)
  if (ax >= 0x38800000u) {                        // normal half: rebias exponent, round 13 bits
    const uint32_t m = ax - 0x38000000u;
    return sign | ((m + 0x0FFFu + ((m >> 13) & 1u)) >> 13);
  }
  const uint32_t e = ax >> 23;  // below 2^-14: half subnormal, unit 2^-24
  if (e < 102) return sign;     // < 2^-25: rounds to zero
  const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u, shift = 126 - e;  // shift in [14, 24]
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
  uint32_t q = mant >> shift;
  q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return sign | q;
}

// ---- monotone integer order of bit patterns: ... -0 -> -1, +0 -> 0, ... ----
template <class F>
LORA_EXT_HD int64_t key(uint32_t b) {
  constexpr uint32_t sign = 1u << (F::kBits - 1);
  const int64_t mag = static_cast<int64_t>(b & (sign - 1u));
  return (b & sign) ? -mag - 1 : mag;
}
template <class F>
LORA_EXT_HD uint32_t from_key(int64_t k) {
  constexpr uint32_t sign = 1u << (F::kBits - 1);
  constexpr uint32_t all = F::kBits == 32 ? 0xFFFFFFFFu : ((1u << F::kBits) - 1u);
  // Keys outside the format's range give some pattern; the caller's check rejects it.
  const uint32_t b = k >= 0 ? static_cast<uint32_t>(k) : (static_cast<uint32_t>(-(k + 1)) | sign);
  return b & all;
}

// Low k bits of key(w0): what the side information keeps of W0 (k = 0: nothing).
template <class F>
LORA_EXT_HD uint32_t code_of(uint32_t w0, int k) {
  return static_cast<uint32_t>(key<F>(w0)) & ((1u << k) - 1u);
}

// Reconstructs W0 from the merged value w, the merged sum s and W0's code (a NaN w is its
// own W0: NaN elements of W0 are fixed points).
template <class F>
LORA_EXT_HD uint32_t rec(uint32_t w, float s, uint32_t code, int k) {
  if (is_nan<F>(w)) return w;
  const float wf = decode(F{}, w);
  const float t = wf - s;                                 // W0 ~ t
  const float bv = t - wf, av = t - bv;                   // TwoSum: wf - s == t + err exactly
  const float err = (wf - av) + (-s - bv);
  const uint32_t xb = encode(F{}, t);
  if (k == 0) return xb;
  const float xf = decode(F{}, xb);
  const int64_t up = (t > xf || (t == xf && err > 0.f)) ? 1 : 0;
  const int64_t base = key<F>(xb) - (int64_t{1} << (k - 1)) + up;  // window [base, base + 2^k)
  const int64_t mask = (int64_t{1} << k) - 1;
  return from_key<F>(base + ((static_cast<int64_t>(code) - base) & mask));
}

// Merged value of w0 under the sum s (has_delta == false: the empty set, w0 itself; a NaN
// w0 stays as it is).
template <class F>
LORA_EXT_HD uint32_t merged(uint32_t w0, float s, bool has_delta) {
  return has_delta && !is_nan<F>(w0) ? encode(F{}, decode(F{}, w0) + s) : w0;
}

// One element of a transition between adapter sets: w (current bits) -> new bits.
// has_old == false: w is W0 itself (first merge). Returns false when the new value
// could not be reconstructed: then W0 is written back instead and the caller records
// the element as an exception.
template <class F>
LORA_EXT_HD bool transition(uint32_t& w, float s_old, float s_new, uint32_t code, int k,
                            bool has_old, bool has_new) {
  const uint32_t w0 = has_old ? rec<F>(w, s_old, code, k) : w;
  if (!has_new) {
    w = w0;
    return true;
  }
  const uint32_t wn = merged<F>(w0, s_new, true);
  const bool ok = rec<F>(wn, s_new, code, k) == w0;
  w = ok ? wn : w0;
  return ok;
}

// Code widths an exact merge may use, and whether the k-bit code of w0 restores it after a merge
// under s (what merge_code_failures counts).
LORA_EXT_HD constexpr int code_width(int c) { return c == 3 ? 4 : c; }  // c = 0..3: 0, 1, 2, 4
template <class F>
LORA_EXT_HD bool code_restores(uint32_t w0, float s, int k) {
  return rec<F>(merged<F>(w0, s, true), s, code_of<F>(w0, k), k) == w0;
}

// Codes are packed little-endian into 32-bit words: element e uses bits
// [(e*k) % 32, (e*k) % 32 + k) of word (e*k) / 32 (k divides 32, no straddling).
LORA_EXT_HD uint32_t read_code(const uint32_t* codes, int64_t e, int k) {
  if (k == 0) return 0;
  const int64_t bit = e * k;
  return (codes[bit >> 5] >> (bit & 31)) & ((1u << k) - 1u);
}

}  // namespace lora_ext::merge_math
