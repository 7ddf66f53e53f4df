// fp32 register-blocked micro-kernel shared by the CPU kernels (torch-free).
//
// Tiling: C[6, 16] = sum_k a_rows[m][k] * panel[k][0:16]
//   - 6 rows of the left operand are given as row pointers, so token rows can
//     be read in place from x (any row stride) and short tails point at a zero row;
//   - the right operand is packed once per call into 16-wide panels
//     [K][16] (zero padded), so each k step is 2 vector loads + 6 broadcasts
//     feeding 12 independent FMAs of 8 lanes (12 accumulators + 3 temporaries
//     fit the 16 AVX2 registers).
// Written with GCC's generic vector extensions; on x86-64 an AVX-512 and an AVX2+FMA build are
// picked at load time (lowrank_microkernel.cpp), else the baseline ISA.
#pragma once
#include <cstdint>
#include <cstring>

namespace lora_ext::cpu {

// Function multi-versioning for vectorised loops written with the generic vector types: the
// AVX2+FMA (x86-64-v3) or AVX-512 (x86-64-v4) clone is picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_EXT_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define LORA_EXT_CLONES
#endif

constexpr int kMR = 6;   // rows per micro tile
constexpr int kNR = 16;  // columns per micro tile (one packed panel)

// out[6][16] = sum_{k < K} rows[m][k] * panel[k * 16 + n]
void micro_6x16(int64_t K, const float* const rows[kMR], const float* panel, float out[kMR][kNR]);

// dst[m][0:16] = src[m][0:16] + alpha * sum_{k < K} rows[m][k] * panel[k * 16 + n], rounded once
// into the element type: float, uint16_t (bf16 bits) or _Float16, with c10's rounding (vec16.h).
// All 16 columns valid; src[m] may be dst[m] (accumulate) or any other row (a bias row, zeros);
// rows past the valid ones may point at a zero row and src/dst at scratch.
void micro_6x16_acc(int64_t K, const float* const rows[kMR], const float* panel,
                    const float* const src[kMR], float* const dst[kMR], float alpha);
void micro_6x16_acc(int64_t K, const float* const rows[kMR], const float* panel,
                    const uint16_t* const src[kMR], uint16_t* const dst[kMR], float alpha);
void micro_6x16_acc(int64_t K, const float* const rows[kMR], const float* panel,
                    const _Float16* const src[kMR], _Float16* const dst[kMR], float alpha);

constexpr int64_t kTB = 4 * kMR;  // most token rows per block of the panel kernels
constexpr int64_t kKC = 256;      // K chunk of the panel shrink (an A panel chunk: 16 KiB, in L1)

// u[q][p*16 : p*16+16] += sum_{k < K} rows[q][k] * Apk[p][k][0:16] for q < nt (<= kTB), p < rp:
// the shrink of a block of token rows against A packed as rp panels (pack_panels), K in chunks of
// kKC so each panel chunk stays in L1 across the 6-row groups. u rows have stride us (>= 16 rp);
// zeros: >= K zeros, the rows past nt in the last group.
void shrink_block(int64_t nt, int64_t K, int64_t rp, const float* const* rows, const float* Apk,
                  float* u, int64_t us, const float* zeros);

// bf16 shrink on the AVX512-BF16 dot-product instructions (bf16_dot.cpp): the same product as
// shrink_block with bf16 rows read in place (no fp32 copy of x) and A packed as bf16 pairs by
// pack_pairs_bf16; each instruction multiplies two k at once, the products are exact in fp32 and
// summed in fp32 (inputs and results below 2^-126 count as zero: the instructions' DAZ/FTZ).
// Used when bf16_dot() (the CPU has them and $LORA_EXT_CPU_ISA allows them).
bool bf16_dot();
// The kernels picked at load time: "avx512+bf16", "avx512", "avx2" or "baseline".
const char* cpu_isa();
// Whether fp16 goes through the F16C conversion instructions (rows16, the fp16 decode tiles):
// every kernel set but the baseline one requires them.
bool f16c_conversions();
// Whether the kernel set picked is an AVX-512 one (the merge kernels' 16-lane paths).
bool avx512_kernels();
// dst[p][kp][c][h] = src[p*16 + c][2 kp + h] (bf16 bits) for kp < ceil(K/2), zero past N and K;
// dst holds ceil(N/16) * ceil(K/2) * 32 elements.
void pack_pairs_bf16(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst,
                     int64_t p_begin, int64_t p_end);
// u[q][p*16 : p*16+16] += sum_{k < K} rows[q][k] * A[p*16 + c][k]; zeros: >= K + 1 zeros.
void shrink_block_bf16(int64_t nt, int64_t K, int64_t rp, const uint16_t* const* rows,
                       const uint16_t* Apk, float* u, int64_t us, const uint16_t* zeros);
// u[t][j] = A[j, :K] . x[t, :K] for t < nt (<= 4), j < r, A rows unpacked (row stride lda): the
// few-tokens shrink (multi_microkernel.h's shrink_tile on these instructions).
void shrink_rows_bf16(const uint16_t* A, int64_t lda, int64_t r, const uint16_t* const* x, int nt,
                      int64_t K, float* const* u);

constexpr int kTR = 8;  // rows (ranks) per weight-gradient tile

// Weight-gradient (T^T N) update, k running over tokens:
//   c[m][0:16] += sum_{k < K} a[k * lda + m] * brows[k][n0 : n0 + 16]   (m < 8)
// a: 8 columns of a [K, lda] fp32 block (the [T, r] factor, zero padded to whole groups of 8);
// brows: K fp32 rows read in place from column n0 (16 columns must exist); c[m] may be scratch.
void micro_tn_8x16_acc(int64_t K, const float* a, int64_t lda, const float* const* brows, int64_t n0,
                       float* const c[kTR]);

// Packs the rows src[j, 0:K] (j < N, row stride ld, any of the three element
// types converted by `load`) as panels: dst[p][k][c] = src[p*16 + c][k], zero past N.
// dst holds ceil(N/16) * K * 16 floats.
template <class T, class Load>
void pack_panels(const T* src, int64_t N, int64_t K, int64_t ld, float* dst, Load load,
                 int64_t p_begin, int64_t p_end) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    float* d = dst + p * K * kNR;
    for (int c = 0; c < kNR; ++c) {
      const int64_t j = p * kNR + c;
      if (j < N) {
        const T* s = src + j * ld;
        for (int64_t k = 0; k < K; ++k) d[k * kNR + c] = load(s[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * kNR + c] = 0.f;
      }
    }
  }
}

}  // namespace lora_ext::cpu
