// CPU kernels of multi_lora_, lora_shrink and lora_expand_ (one adapter per token).
//
// Tokens are grouped by adapter first (a counting sort: perm[T] + offsets[S + 1], which
// also validates every index and rank). Then two at::parallel_for phases over work items:
//   shrink: adapters with >= kShrinkPanelMin tokens: item = (slice, adapter, kTB tokens); the
//     thread packs A[slice, a, :r] into 16-wide fp32 panels once per adapter of its contiguous
//     run of items, widens each x row once, and runs the 6x16 micro-kernel over K chunks (bf16
//     on CPUs with AVX512-BF16: A packed as bf16 pairs, x rows read in place, bf16_dot.cpp).
//     Others: item = (slice, adapter, <= 16 tokens, <= 64 rank rows) with shrink_tile (2 rank
//     rows x 4 tokens of vector accumulators, no packing; padded rank rows are never read; bf16
//     with AVX512-BF16: 4 x 4 dot products on the bf16 rows, multi_microkernel.h).
//   expand: item = (slice, adapter, its tokens, 256 output columns); y[t, cols] +=
//     s_a * B[a, cols, :r] u[t, :r]. Groups of >= kPanelMin tokens pack the B block once
//     into 16-wide fp32 panels and run the 6x16 micro-kernel, accumulating into y rows in place
//     (16-bit rows rounded once in its epilogue); smaller groups use expand_rows (8 dot products
//     folded by shuffles) and skip the packing.
// u is an fp32 [n, T, r_max] buffer; y is rounded once per element.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../multi_glue.h"
#include "ops_cpu.h"
#include "lowrank_microkernel.h"
#include "multi_microkernel.h"
#include "rows16.h"

namespace lora_ext::cpu {
namespace {

constexpr int64_t kShrinkTok = 16, kShrinkRows = 64, kExpandCols = 256, kPanelMin = 6;
// shrink panel path (shrink_block): adapters with this many tokens, kTB tokens per item
constexpr int64_t kShrinkPanelMin = 48;

struct Groups {
  std::vector<int32_t> perm, off;  // tokens sorted by adapter; adapter a owns [off[a], off[a+1])
};

Groups group_tokens(const char* op, const MultiArgs& a) {
  Groups g;
  g.off.assign(a.S + 1, 0);
  std::vector<int32_t> idx(a.T);
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t v = a.idx64 ? a.idx.data_ptr<int64_t>()[t] : a.idx.data_ptr<int32_t>()[t];
    TORCH_CHECK(v >= -1 && v < a.S, op, ": indices[", t, "] = ", v, " is out of range; valid are",
                " -1 (no adapter) and 0 .. S-1 = ", a.S - 1,
                v == INT32_MIN ? " (LoRAContext's mark for an index that does not fit int32, or, "
                                 "under torch.compile, for a layer input whose rows/tokens differ "
                                 "from the number of indices set)"
                               : "");
    idx[t] = static_cast<int32_t>(v);
    if (v >= 0) ++g.off[v + 1];
  }
  for (int64_t s = 0; s < a.S; ++s) g.off[s + 1] += g.off[s];
  std::vector<int32_t> cur(g.off.begin(), g.off.end() - 1);
  g.perm.resize(g.off[a.S]);
  for (int64_t t = 0; t < a.T; ++t)
    if (idx[t] >= 0) g.perm[cur[idx[t]]++] = static_cast<int32_t>(t);
  const int32_t* rk = a.ranks.data_ptr<int32_t>();
  for (int64_t i = 0; i < a.ranks.numel(); ++i)
    TORCH_CHECK(rk[i] >= 0 && rk[i] <= a.r_max, op, ": ranks[", i, "] = ", rk[i],
                " must be in 0 .. r_max = ", a.r_max);
  return g;
}

inline int64_t rank_of(const MultiArgs& a, int64_t sl, int64_t s) {
  return a.ranks.data_ptr<int32_t>()[sl * a.slot_stride + s];
}

// Element type seen by the torch-free vector kernels.
template <class T> struct Raw;
template <> struct Raw<float> { using type = float; };
template <> struct Raw<c10::Half> { using type = _Float16; };
template <> struct Raw<c10::BFloat16> { using type = uint16_t; };

inline void shrink_tile(const float* A, int64_t lda, int64_t r, const float* const* x, int nt,
                        int64_t K, float* const* u) {
  shrink_tile_f32(A, lda, r, x, nt, K, u);
}
inline void shrink_tile(const _Float16* A, int64_t lda, int64_t r, const _Float16* const* x,
                        int nt, int64_t K, float* const* u) {
  shrink_tile_f16(A, lda, r, x, nt, K, u);
}
inline void shrink_tile(const uint16_t* A, int64_t lda, int64_t r, const uint16_t* const* x,
                        int nt, int64_t K, float* const* u) {
  shrink_tile_bf16(A, lda, r, x, nt, K, u);
}
inline void expand_rows(const float* B, int64_t ldb, int64_t r, int64_t n, const float* u,
                        float* o) {
  expand_rows_f32(B, ldb, r, n, u, o);
}
inline void expand_rows(const _Float16* B, int64_t ldb, int64_t r, int64_t n, const float* u,
                        float* o) {
  expand_rows_f16(B, ldb, r, n, u, o);
}
inline void expand_rows(const uint16_t* B, int64_t ldb, int64_t r, int64_t n, const float* u,
                        float* o) {
  expand_rows_bf16(B, ldb, r, n, u, o);
}

template <class T>
typename Raw<T>::type* raw(T* p) {
  return reinterpret_cast<typename Raw<T>::type*>(p);
}

// y[0:n] = round(y[0:n] + s * v[0:n]), v fp32
template <class T>
void add_scaled(T* y, const float* v, float s, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t c = 0; c < n; ++c) y[c] += s * v[c];
  } else {
    axpy_rounded(raw(y), v, s, n);
  }
}

// u[sl, t, :rank] = A[sl, a, :rank] . x[t] for every grouped token (u pre-zeroed).
// Adapters with >= kShrinkPanelMin tokens: items of kTB tokens; a thread packs the adapter's A
// into fp32 panels when its (contiguous) run of items reaches a new adapter, converts each x row
// once, and runs the 6x16 micro-kernel over K chunks (A panel chunks stay in L1). Others: items
// of kShrinkTok tokens x kShrinkRows rank rows through shrink_tile (no packing).
template <class T>
void shrink_phase(const MultiArgs& a, const Groups& g, float* u) {
  using E = typename Raw<T>::type;
  struct Item { int64_t sl, s, t0, t1, j0, j1; bool panel; };
  std::vector<Item> items;
  for (int64_t sl = 0; sl < a.n; ++sl)
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t r = rank_of(a, sl, s), t_end = g.off[s + 1];
      if (r > 0 && t_end - g.off[s] >= kShrinkPanelMin) {
        for (int64_t t0 = g.off[s]; t0 < t_end; t0 += kTB)
          items.push_back({sl, s, t0, std::min(t0 + kTB, t_end), 0, r, true});
        continue;
      }
      for (int64_t t0 = g.off[s]; t0 < t_end; t0 += kShrinkTok)
        for (int64_t j0 = 0; j0 < r; j0 += kShrinkRows)
          items.push_back({sl, s, t0, std::min<int64_t>(t0 + kShrinkTok, t_end), j0,
                           std::min(r, j0 + kShrinkRows)});
    }
  const E* x = reinterpret_cast<const E*>(a.x2.data_ptr<T>());
  const E* A = reinterpret_cast<const E*>(a.A.data_ptr<T>());
  const int64_t ldx = a.T > 1 ? a.x2.stride(0) : a.in, in = a.in;
  const bool dot = std::is_same_v<T, c10::BFloat16> && bf16_dot();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<float> Apk, xbuf, ubuf, zeros;
    std::vector<uint16_t> Apk2;
    int64_t packed = -1;  // sl * S + s of the adapter in Apk / Apk2
    for (int64_t i = b; i < e; ++i) {
      const Item& it = items[i];
      const int64_t ad = it.sl * a.S + it.s;
      const E* As = A + (ad * a.r_max + it.j0) * in;
      if (!it.panel) {
        for (int64_t t = it.t0; t < it.t1; t += 4) {
          const int nt = static_cast<int>(std::min<int64_t>(4, it.t1 - t));
          const E* xr[4];
          float* ur[4];
          for (int q = 0; q < nt; ++q) {
            const int64_t tok = g.perm[t + q];
            xr[q] = x + tok * ldx;
            ur[q] = u + (it.sl * a.T + tok) * a.r_max + it.j0;
          }
          shrink_tile(As, in, it.j1 - it.j0, xr, nt, in, ur);
        }
        continue;
      }
      const int64_t r = it.j1, rp = (r + kNR - 1) / kNR, us = rp * kNR, nt = it.t1 - it.t0;
      zeros.resize(in + 1, 0.f);
      ubuf.assign(kTB * us, 0.f);
      if (dot) {  // bf16 rows in place, A as bf16 pairs (bf16_dot.cpp)
        if (packed != ad) {
          Apk2.resize(rp * ((in + 1) / 2) * 2 * kNR);
          pack_pairs_bf16(reinterpret_cast<const uint16_t*>(As), r, in, in, Apk2.data(), 0, rp);
          packed = ad;
        }
        const uint16_t* xrows[kTB];
        for (int64_t q = 0; q < nt; ++q) xrows[q] = reinterpret_cast<const uint16_t*>(x + g.perm[it.t0 + q] * ldx);
        shrink_block_bf16(nt, in, rp, xrows, Apk2.data(), ubuf.data(), us,
                          reinterpret_cast<const uint16_t*>(zeros.data()));
      } else {
        if (packed != ad) {
          Apk.resize(rp * in * kNR);
          pack_panels(reinterpret_cast<const T*>(As), r, in, in, Apk.data(),
                      [](T v) { return static_cast<float>(v); }, 0, rp);
          packed = ad;
        }
        if constexpr (!std::is_same_v<T, float>) {
          xbuf.resize(kTB * in);
          for (int64_t q = 0; q < nt; ++q) to_f32(x + g.perm[it.t0 + q] * ldx, in, xbuf.data() + q * in);
        }
        const float* xrows[kTB];
        for (int64_t q = 0; q < nt; ++q) {
          if constexpr (std::is_same_v<T, float>) {
            xrows[q] = x + g.perm[it.t0 + q] * ldx;
          } else {
            xrows[q] = xbuf.data() + q * in;
          }
        }
        shrink_block(nt, in, rp, xrows, Apk.data(), ubuf.data(), us, zeros.data());
      }
      for (int64_t q = 0; q < nt; ++q)
        std::copy(ubuf.data() + q * us, ubuf.data() + q * us + r, u + (it.sl * a.T + g.perm[it.t0 + q]) * a.r_max);
    }
  });
}

// y[t, cols of slice sl] += scale[sl, a] * B[a, cols, :rank] u[sl, t, :rank].
template <class T>
void expand_phase(const MultiArgs& a, const Groups& g, const float* u) {
  using E = typename Raw<T>::type;
  struct Item { int64_t sl, s, o0, o1; };
  std::vector<Item> items;
  for (int64_t sl = 0; sl < a.n; ++sl)
    for (int64_t s = 0; s < a.S; ++s) {
      if (g.off[s + 1] == g.off[s] || rank_of(a, sl, s) == 0) continue;
      for (int64_t o0 = a.out_off[sl]; o0 < a.out_off[sl + 1]; o0 += kExpandCols)
        items.push_back({sl, s, o0, std::min(o0 + kExpandCols, a.out_off[sl + 1])});
    }
  const T* B = a.B.data_ptr<T>();
  const float* scales = a.scales.data_ptr<float>();
  T* y = a.y2.data_ptr<T>();
  const int64_t ldy = a.T > 1 ? a.y2.stride(0) : a.out;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<float> panels, res(kExpandCols), zeros(a.r_max, 0.f);
    float tile[kMR][kNR];
    E scratch[kNR] = {};
    for (int64_t i = b; i < e; ++i) {
      const Item& it = items[i];
      const int64_t r = rank_of(a, it.sl, it.s), nc = it.o1 - it.o0;
      const float sc = scales[it.sl * a.slot_stride + it.s];
      const T* Bs = B + (it.s * a.out + it.o0) * a.r_max;
      const int32_t* toks = g.perm.data() + g.off[it.s];
      const int64_t m = g.off[it.s + 1] - g.off[it.s];
      auto urow = [&](int64_t q) { return u + (it.sl * a.T + toks[q]) * a.r_max; };
      if (m >= kPanelMin) {
        const int64_t np = (nc + kNR - 1) / kNR;
        panels.resize(np * r * kNR);
        pack_panels(Bs, nc, r, a.r_max, panels.data(),
                    [](T v) { return static_cast<float>(v); }, 0, np);
        const float* rows[kMR];
        E* crow[kMR];
        for (int64_t q0 = 0; q0 < m; q0 += kMR) {
          const int mq = static_cast<int>(std::min<int64_t>(kMR, m - q0));
          for (int q = 0; q < kMR; ++q) rows[q] = q < mq ? urow(q0 + q) : zeros.data();
          auto yrow = [&](int q) { return y + toks[q0 + q] * ldy + it.o0; };
          // Whole panels: y rows += s * u B^T in the micro-kernel's epilogue (rounded once into
          // T, read and written in place); a partial last panel through a tile. 16-bit rows: the
          // next group's rows (scattered: this adapter's tokens) are fetched meanwhile (fp32
          // measured slower with it).
          for (int64_t q = q0 + kMR; !std::is_same_v<T, float> && q < std::min(m, q0 + 2 * kMR); ++q) {
            const char* p0 = reinterpret_cast<const char*>(y + toks[q] * ldy + it.o0);
            for (int64_t b = 0; b < nc * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p0 + b, 1);
          }
          for (int64_t p = 0; p < np; ++p) {
            const int64_t c1 = std::min<int64_t>(kNR, nc - p * kNR);
            if (c1 == kNR) {
              for (int q = 0; q < kMR; ++q) crow[q] = q < mq ? raw(yrow(q)) + p * kNR : scratch;
              micro_6x16_acc(r, rows, panels.data() + p * r * kNR, crow, crow, sc);
            } else {
              micro_6x16(r, rows, panels.data() + p * r * kNR, tile);
              for (int q = 0; q < mq; ++q) add_scaled(yrow(q) + p * kNR, tile[q], sc, c1);
            }
          }
        }
      } else {
        for (int64_t q = 0; q < m; ++q) {
          expand_rows(reinterpret_cast<const E*>(Bs), a.r_max, r, nc, urow(q), res.data());
          add_scaled(y + toks[q] * ldy + it.o0, res.data(), sc, nc);
        }
      }
    }
  });
}

void finish_y(const MultiArgs& a, at::Tensor& y) {
  if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
}

}  // namespace

void multi_lora_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A_pool,
                    const at::Tensor& B_pool, const at::Tensor& indices, const at::Tensor& scales,
                    const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                    const std::optional<at::Tensor>& bad_index_count) {
  const char* op = "multi_lora_";
  MultiArgs a = check_multi_lora(op, y, x, A_pool, B_pool, indices, scales, ranks, out_slices,
                                 bad_index_count);
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel called with x on ", x.device());
  const Groups g = group_tokens(op, a);
  if (a.T == 0 || a.out == 0) return;
  at::Tensor u = at::zeros({a.n, a.T, a.r_max}, x.options().dtype(at::kFloat));
  dispatch_dtype<float, c10::Half, c10::BFloat16>(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    shrink_phase<T>(a, g, u.data_ptr<float>());
    expand_phase<T>(a, g, u.data_ptr<float>());
  });
  finish_y(a, y);
}

static at::Tensor shrink_impl(const at::Tensor& x, const at::Tensor& A_pool,
                           const at::Tensor& indices, const at::Tensor& ranks,
                           const std::optional<at::Tensor>& bad_index_count, double scale) {
  const char* op = "lora_shrink";
  MultiArgs a = check_shrink(op, x, A_pool, indices, ranks, scale, bad_index_count);
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel called with x on ", x.device());
  const Groups g = group_tokens(op, a);
  at::Tensor u = at::zeros({a.n, a.T, a.r_max}, x.options().dtype(at::kFloat));
  if (a.T > 0)
    dispatch_dtype<float, c10::Half, c10::BFloat16>(a.dtype, [&](auto tag) {
      shrink_phase<typename decltype(tag)::type>(a, g, u.data_ptr<float>());
    });
  if (a.u_scale != 1.f) u.mul_(a.u_scale);
  return A_pool.dim() == 4 ? u : u.view({a.T, a.r_max});
}

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A_pool,
                           const at::Tensor& indices, const at::Tensor& ranks, double scale) {
  return shrink_impl(x, A_pool, indices, ranks, std::nullopt, scale);
}

at::Tensor lora_shrink_counted_cpu(const at::Tensor& x, const at::Tensor& A_pool,
                                 const at::Tensor& indices, const at::Tensor& ranks,
                                 at::Tensor bad_index_count, double scale) {
  return shrink_impl(x, A_pool, indices, ranks, bad_index_count, scale);
}

void lora_expand_cpu(at::Tensor y, const at::Tensor& u, const at::Tensor& B_pool,
                     const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& ranks,
                     at::OptionalIntArrayRef out_slices,
                     const std::optional<at::Tensor>& bad_index_count, bool add_inputs) {
  const char* op = "lora_expand_";
  MultiArgs a = check_expand(op, y, u, B_pool, indices, scales, ranks, out_slices,
                             bad_index_count);
  TORCH_CHECK(y.device().is_cpu(), op, ": CPU kernel called with y on ", y.device());
  const Groups g = group_tokens(op, a);
  if (!add_inputs) a.y2.zero_();
  if (a.T == 0 || a.out == 0) return finish_y(a, y);
  dispatch_dtype<float, c10::Half, c10::BFloat16>(a.dtype, [&](auto tag) {
    expand_phase<typename decltype(tag)::type>(a, g, a.u.data_ptr<float>());
  });
  finish_y(a, y);
}

}  // namespace lora_ext::cpu
