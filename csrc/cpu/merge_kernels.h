// remerge_'s per-element step (merge_math::transition: reconstruct W0, merge the new sum,
// verify) 16 elements at a time on AVX-512, bit for bit the scalar code, and merge_'s tile
// (merge_kernels.cpp).
#pragma once
#include <cstdint>

namespace lora_ext::cpu::merge_kernels {

// The kernel set picked at load time (lowrank_microkernel.h: the CPU's best, or a lower one
// named by $LORA_EXT_CPU_ISA): AVX-512 (this file's 16-lane kernels), or AVX2 + FMA + F16C
// (merge_cpu.cpp's 8-lane tiles; every set but the baseline one).
bool available();
bool avx2_tiles();

inline void atomic_or(uint32_t* word, uint32_t bits) {
  if (bits) __atomic_fetch_or(word, bits, __ATOMIC_RELAXED);
}

// fma chain over j < Rt of l[j] * r[j * ldr], from +0: merge_math's S of one element (one fma
// instruction per term where the CPU has it, else libm's fmaf: correctly rounded either way).
float fma_chain(const float* l, const float* r, int64_t ldr, int64_t Rt);

// One row piece of remerge_ for format F (merge_math::F32 / F16 / BF16; R: its raw type): the
// n <= 16 consecutive elements w[0:n], element index e0 in the contiguous weight; so / sn: their
// old / new sums (16 floats each, read only when has_old / has_new). First merge (!has_old): the
// k-bit codes of the W0 values are OR-ed into `codes` (bit e * k; atomically only into the words
// at the piece's ends: concurrent pieces must cover disjoint elements), else read from it. Returns
// the mask of the elements whose new value the codes cannot restore (W0 written back instead).
template <class F, class R>
uint32_t transition_piece(R* w, int n, int64_t e0, const float* so, const float* sn,
                          uint32_t* codes, int k, bool has_old, bool has_new);

// merge_'s delta tile (also dora_norm's): S[m][c] = fma chain over j < Rt of L[m * Rt + j] *
// R[j * ldr + c], from +0, for m < 6, c < 16; every path gives the same bits. s_tile() is the
// fastest one of the kernel set picked (AVX-512, AVX2 + FMA, portable; merge_cpu.cpp).
constexpr int kTileRows = 6, kTileCols = 16;
using STile = void (*)(const float* L, int64_t Rt, const float* R, int64_t ldr,
                       float S[kTileRows][kTileCols]);
STile s_tile();
// The AVX-512 one, where available() (defined on x86-64 only).
void s_tile_avx512(const float* L, int64_t Rt, const float* R, int64_t ldr,
                   float S[kTileRows][kTileCols]);

// merge_'s full 6 x 16 tile, where available() (defined on x86-64 only):
// W[m * ld + c] = merged(W, S[m][c]) for m < 6, c < 16, with S[m][c] the fma chain over j < Rt of
// L[m * Rt + j] * Rp[j * 16 + c] from +0 (Rp: a 16-column panel of R).
template <class F, class R>
void merge_tile(R* W, int64_t ld, const float* L, int64_t Rt, const float* Rp);

}  // namespace lora_ext::cpu::merge_kernels
