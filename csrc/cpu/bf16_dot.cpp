// bf16 shrink on the AVX512-BF16 dot-product instruction (vdpbf16ps), torch-free.
//
// Tiling: the same 6 x 16 tile as micro_6x16 (lowrank_microkernel.h), two k at a time: A is packed
// as [ceil(K/2)][16 ranks][2 k] bf16 pairs (one 64-byte register per k pair), each token row's
// pair (x[2kp], x[2kp+1]) is broadcast as one 32-bit lane pattern, and vdpbf16ps adds both
// products to 16 fp32 accumulators. k pairs are unrolled by two into 12 accumulators (6 rows x 2)
// to cover the instruction's latency. K runs in chunks of kKC so a panel chunk (8 KiB) stays in
// L1 across the 6-row groups of a token block; an odd K's last element is read alone (no read
// past a row). Few tokens (shrink_rows_bf16, no packing): 4 rank rows x 4 token rows of dot
// products along K, 32 k per instruction, summed across lanes at the end.
// Without the instructions (other CPUs, LORA_EXT_CPU_ISA) the fp32 kernels run.
#include <algorithm>
#include <cstring>

#include "lowrank_microkernel.h"
#include "vec16.h"  // <immintrin.h> on x86-64

namespace lora_ext::cpu {

static_assert(kKC % 2 == 0, "K chunks must start on a bf16 pair");

void pack_pairs_bf16(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst,
                     int64_t p_begin, int64_t p_end) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t p = p_begin; p < p_end; ++p) {
    uint16_t* d = dst + p * K2 * 2 * kNR;
    for (int c = 0; c < kNR; ++c) {
      const int64_t j = p * kNR + c;
      uint16_t* dc = d + 2 * c;  // pair kp of column c at dc[kp * 32]
      if (j >= N) {
        for (int64_t kp = 0; kp < K2; ++kp) dc[kp * 2 * kNR] = dc[kp * 2 * kNR + 1] = 0;
        continue;
      }
      const uint16_t* s = src + j * ld;
      for (int64_t kp = 0; kp < K / 2; ++kp) std::memcpy(dc + kp * 2 * kNR, s + 2 * kp, 4);
      if (K % 2) {
        dc[(K / 2) * 2 * kNR] = s[K - 1];
        dc[(K / 2) * 2 * kNR + 1] = 0;
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

#define LORA_EXT_BF16 __attribute__((target("avx512f,avx512bf16")))
#define LORA_EXT_BF16_BW __attribute__((target("avx512f,avx512bw,avx512bf16")))

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// c[m][0:16] += sum over k < 2 np (+ 1 if odd) of rows[m][k] * panel pairs
LORA_EXT_BF16 void dot_6x16(int64_t np, bool odd, const uint16_t* const* rows, const uint16_t* panel,
                            float* const* c) {
  __m512 acc[kMR], acc2[kMR];
  for (int m = 0; m < kMR; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
  int64_t kp = 0;
  for (; kp + 1 < np; kp += 2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + (kp + 1) * 2 * kNR);
#pragma GCC unroll 6
    for (int m = 0; m < kMR; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(pair_at(rows[m] + 2 * kp)), b0);
      acc2[m] = _mm512_dpbf16_ps(acc2[m], (__m512bh)_mm512_set1_epi32(pair_at(rows[m] + 2 * kp + 2)), b1);
    }
  }
  for (; kp < np + (odd ? 1 : 0); ++kp) {  // a last whole pair, then an odd K's last element
    const __m512bh b = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * kNR);
    for (int m = 0; m < kMR; ++m) {
      const uint32_t v = kp < np ? pair_at(rows[m] + 2 * kp) : rows[m][2 * kp];
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(static_cast<int>(v)), b);
    }
  }
  for (int m = 0; m < kMR; ++m)
    _mm512_storeu_ps(c[m], _mm512_add_ps(_mm512_loadu_ps(c[m]), _mm512_add_ps(acc[m], acc2[m])));
}

// out[j][t] = a[j][:K] . x[t][:K] for 4 rank rows x 4 token rows: 16 accumulators, 32 k per
// instruction pair of loads; the last K % 32 elements through masked (zero-filling) loads.
LORA_EXT_BF16_BW void dot_rows_4x4(const uint16_t* const* a, const uint16_t* const* x, int64_t K,
                                   float (*out)[4]) {
  __m512 acc[4][4];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 keep = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
    __m512bh av[4];
    for (int j = 0; j < 4; ++j) av[j] = (__m512bh)_mm512_maskz_loadu_epi16(keep, a[j] + k);
    for (int t = 0; t < 4; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(keep, x[t] + k);
      for (int j = 0; j < 4; ++j) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], av[j], xv);
    }
  }
  for (int j = 0; j < 4; ++j)
    for (int t = 0; t < 4; ++t) out[j][t] = _mm512_reduce_add_ps(acc[j][t]);
}

}  // namespace

void shrink_rows_bf16(const uint16_t* A, int64_t lda, int64_t r, const uint16_t* const* x, int nt,
                      int64_t K, float* const* u) {
  float out[4][4];
  const uint16_t* xs[4];
  for (int t = 0; t < 4; ++t) xs[t] = x[t < nt ? t : 0];  // short groups repeat a row (unused)
  for (int64_t j0 = 0; j0 < r; j0 += 4) {
    const uint16_t* as[4];
    for (int j = 0; j < 4; ++j) as[j] = A + std::min<int64_t>(j0 + j, r - 1) * lda;
    dot_rows_4x4(as, xs, K, out);
    for (int t = 0; t < nt; ++t)
      for (int j = 0; j < 4 && j0 + j < r; ++j) u[t][j0 + j] = out[j][t];
  }
}

void shrink_block_bf16(int64_t nt, int64_t K, int64_t rp, const uint16_t* const* rows,
                       const uint16_t* Apk, float* u, int64_t us, const uint16_t* zeros) {
  const int64_t K2 = (K + 1) / 2;
  const uint16_t* a[kMR];
  float* c[kMR];
  float scratch[kNR];
  for (int64_t p = 0; p < rp; ++p)
    for (int64_t kc = 0; kc < K; kc += kKC) {  // kKC is even: chunks start on a pair
      const int64_t kn = std::min(kKC, K - kc);
      for (int64_t q0 = 0; q0 < nt; q0 += kMR) {
        for (int m = 0; m < kMR; ++m) {
          a[m] = (q0 + m < nt ? rows[q0 + m] : zeros) + kc;
          c[m] = q0 + m < nt ? u + (q0 + m) * us + p * kNR : scratch;
        }
        dot_6x16(kn / 2, kn & 1, a, Apk + (p * K2 + kc / 2) * 2 * kNR, c);
      }
    }
}
#else  // bf16_dot() is false off x86-64
void shrink_rows_bf16(const uint16_t*, int64_t, int64_t, const uint16_t* const*, int, int64_t,
                      float* const*) {
  __builtin_trap();
}
void shrink_block_bf16(int64_t, int64_t, int64_t, const uint16_t* const*, const uint16_t*, float*,
                       int64_t, const uint16_t*) {
  __builtin_trap();
}
#endif

}  // namespace lora_ext::cpu
