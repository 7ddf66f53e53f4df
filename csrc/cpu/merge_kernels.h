// remerge_'s per-element step (merge_math::transition: reconstruct W0, merge the new sum,
// verify) 16 elements at a time on AVX-512, bit for bit the scalar code, and merge_'s tile
// (merge_kernels.cpp).
#pragma once
#include <cstdint>

namespace lora_ext::cpu::merge_kernels {

// Whether the AVX-512 kernels were picked (cpu_isa(): the CPU has them, $LORA_EXT_CPU_ISA allows).
bool available();

// One row piece of remerge_ for format F (merge_math::F32 / F16 / BF16; R: its raw type): the
// n <= 16 consecutive elements w[0:n], element index e0 in the contiguous weight; so / sn: their
// old / new sums (16 floats each, read only when has_old / has_new). First merge (!has_old): the
// k-bit codes of the W0 values are OR-ed into `codes` (bit e * k; atomically only into the words
// at the piece's ends: concurrent pieces must cover disjoint elements), else read from it. Returns
// the mask of the elements whose new value the codes cannot restore (W0 written back instead).
template <class F, class R>
uint32_t transition_piece(R* w, int n, int64_t e0, const float* so, const float* sn,
                          uint32_t* codes, int k, bool has_old, bool has_new);

// merge_'s full 6 x 16 tile, where available() (defined on x86-64 only):
// W[m * ld + c] = merged(W, S[m][c]) for m < 6, c < 16, with S[m][c] the fma chain over j < Rt of
// L[m * Rt + j] * Rp[j * 16 + c] from +0 (Rp: a 16-column panel of R).
template <class F, class R>
void merge_tile(R* W, int64_t ld, const float* L, int64_t Rt, const float* Rp);

}  // namespace lora_ext::cpu::merge_kernels
