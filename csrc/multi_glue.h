// Argument validation of the multi-adapter ops (multi_lora_, lora_shrink, lora_expand_),
// shared by the CPU and CUDA kernels (torch side only).
//
// Layout (n = number of output slices, 1 without out_slices):
//   x [..., in]            y [..., out]           T = x.numel() / in tokens
//   A_pool [S, r_max, in]  (or [n, S, r_max, in] with out_slices)
//   B_pool [S, out, r_max] (slice i owns rows out_off[i] .. out_off[i+1] of every slot)
//   u      [T, r_max] fp32 (or [n, T, r_max] with out_slices)
//   indices: T int32/int64 (any shape with T elements), -1 = no adapter
//   scales [S] or [n, S] fp32, ranks [S] or [n, S] int32 in 0..r_max (0 = empty slot)
#pragma once
#include <cmath>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "checks.h"

namespace lora_ext {

constexpr int64_t kMaxSlices = 8;

struct MultiArgs {
  at::Tensor y2, x2, u, A, B, idx, scales, ranks;
  int64_t T = 0, in = 0, out = 0, S = 0, r_max = 0, n = 1;
  int64_t slot_stride = 0;         // stride between slices in scales/ranks (0 when [S])
  float u_scale = 1.f;             // lora_shrink: u = u_scale * A x
  std::vector<int64_t> out_off;    // n + 1 column offsets of the slices in y / B_pool
  DType dtype = DType::F32;
  bool idx64 = false, copy_back = false;
};

using NamedTensors = std::initializer_list<std::pair<const at::Tensor*, const char*>>;

// `out` (written by the op) shares no memory with any of `reads`.
inline void check_reads(const char* op, const at::Tensor& out, const char* out_name,
                        NamedTensors reads) {
  for (const auto& [t, name] : reads) check_no_overlap(op, out, out_name, *t, name);
}

// The optional device-side counter of out-of-range indices (CUDA adds to it; CPU raises): an
// int32 tensor on the data's device sharing no memory with the op's other tensors.
inline void check_bad_count(const char* op, const std::optional<at::Tensor>& bad,
                            const at::Tensor& ref, NamedTensors others) {
  if (!bad.has_value()) return;
  TORCH_CHECK(bad->scalar_type() == at::kInt && bad->numel() >= 1 && bad->is_contiguous(), op,
              ": bad_index_count must be a contiguous int32 tensor with >= 1 element, got ",
              bad->scalar_type(), " ", bad->sizes());
  TORCH_CHECK(bad->device() == ref.device(), op, ": bad_index_count is on ", bad->device(),
              " but the data is on ", ref.device());
  check_reads(op, *bad, "bad_index_count", others);
}

// A 2-D [T, width] view of t with unit column stride (a contiguous copy when needed).
inline at::Tensor rows_view(const at::Tensor& t, int64_t width) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  at::Tensor v = t.reshape({rows, width});
  if (v.stride(1) != 1 || (v.size(0) > 1 && v.stride(0) < width)) v = v.contiguous();
  return v;
}

// y written in place: a 2-D view when its layout allows, else a contiguous copy (copy_back).
inline void set_y(MultiArgs& a, const at::Tensor& y) {
  if (y.dim() == 2 && y.stride(1) == 1 && (y.size(0) <= 1 || y.stride(0) >= a.out)) {
    a.y2 = y;
  } else if (y.is_contiguous()) {
    a.y2 = y.view({a.T, a.out});
  } else {
    a.y2 = y.reshape({a.T, a.out}).contiguous();
    a.copy_back = true;
  }
}

inline void check_slices(const char* op, MultiArgs& a, at::OptionalIntArrayRef sl) {
  a.out_off = {0};
  if (!sl.has_value()) {
    a.n = 1;
    a.out_off.push_back(a.out);
    return;
  }
  a.n = static_cast<int64_t>(sl->size());
  TORCH_CHECK(a.n >= 1 && a.n <= kMaxSlices, op, ": out_slices must list 1 to ", kMaxSlices,
              " column widths, got ", a.n);
  for (int64_t w : *sl) {  // each entry checked against what is left: no overflow
    TORCH_CHECK(w >= 0 && w <= a.out - a.out_off.back(), op, ": out_slices ", *sl,
                " must be >= 0 and sum to out = ", a.out);
    a.out_off.push_back(a.out_off.back() + w);
  }
  TORCH_CHECK(a.out_off.back() == a.out, op, ": out_slices ", *sl, " must sum to out = ", a.out);
}

// indices, scales and ranks: shapes, dtypes, devices.
inline void check_slot_args(const char* op, MultiArgs& a, const at::Tensor& ref,
                            const at::Tensor& indices, const at::Tensor* scales,
                            const at::Tensor& ranks) {
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == ref.device(), op, ": indices is on ", indices.device(),
              " but x is on ", ref.device());
  TORCH_CHECK(indices.numel() == a.T, op, ": indices must have one entry per token (", a.T,
              "), got ", indices.numel());
  a.idx = indices.reshape({-1}).contiguous();
  a.idx64 = indices.scalar_type() == at::kLong;
  auto slot_vec = [&](const at::Tensor& t, const char* name, at::ScalarType st) {
    TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                " but x is on ", ref.device());
    const bool flat = t.dim() == 1 && t.size(0) == a.S;
    const bool per_slice = t.dim() == 2 && t.size(0) == a.n && t.size(1) == a.S;
    TORCH_CHECK(flat || per_slice, op, ": ", name, " must be [S] = [", a.S, "] or [n, S] = [",
                a.n, ", ", a.S, "], got ", t.sizes());
    return std::make_pair(t.contiguous(), flat ? int64_t{0} : a.S);
  };
  auto [rk, rs] = slot_vec(ranks, "ranks", at::kInt);
  a.ranks = rk;
  a.slot_stride = rs;
  if (scales != nullptr) {
    auto [sc, ss] = slot_vec(*scales, "scales", at::kFloat);
    TORCH_CHECK(ss == rs || a.n == 1, op, ": scales and ranks must both be [S] or both [n, S]");
    a.scales = sc;
  }
}

inline void check_pool_a(const char* op, MultiArgs& a, const at::Tensor& A_pool, bool sliced) {
  if (sliced) {
    TORCH_CHECK(A_pool.dim() == 4 && A_pool.size(0) == a.n, op,
                ": with out_slices, A_pool must be 4-D [n, S, r_max, in] with n = ", a.n,
                ", got shape ", A_pool.sizes());
  } else {
    TORCH_CHECK(A_pool.dim() == 3, op, ": A_pool must be 3-D [S, r_max, in], got shape ",
                A_pool.sizes());
  }
  a.S = A_pool.size(-3);
  a.r_max = A_pool.size(-2);
  TORCH_CHECK(A_pool.size(-1) == a.in, op, ": A_pool must be [S, r_max, in] with in = ", a.in,
              ", got ", A_pool.sizes());
  TORCH_CHECK(a.r_max >= 1, op, ": A_pool needs r_max >= 1, got ", A_pool.sizes());
  a.A = A_pool.contiguous();
}

inline void check_pool_b(const char* op, MultiArgs& a, const at::Tensor& B_pool) {
  TORCH_CHECK(B_pool.dim() == 3, op, ": B_pool must be 3-D [S, out, r_max], got shape ",
              B_pool.sizes());
  TORCH_CHECK(B_pool.size(0) == a.S && B_pool.size(1) == a.out && B_pool.size(2) == a.r_max, op,
              ": B_pool must be [S, out, r_max] = [", a.S, ", ", a.out, ", ", a.r_max, "], got ",
              B_pool.sizes());
  a.B = B_pool.contiguous();
}

inline void check_y(const char* op, MultiArgs& a, const at::Tensor& y, const at::Tensor& x,
                    const char* x_name) {
  TORCH_CHECK(y.dim() >= 1, op, ": y must have at least 1 dim [..., out]");
  a.out = y.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < y.dim(); ++d) rows *= y.size(d);
  TORCH_CHECK(rows == a.T, op, ": y must hold ",
              a.T, " tokens like ", x_name, " (", x_name, " ", x.sizes(), ", y ", y.sizes(), ")");
  TORCH_CHECK(at::has_internal_overlap(y) != at::MemOverlap::Yes, op,
              ": y has internal overlap (e.g. an expanded tensor); it cannot be written in place");
}

// multi_lora_(y, x, A_pool, B_pool, indices, scales, ranks, out_slices)
inline MultiArgs check_multi_lora(const char* op, const at::Tensor& y, const at::Tensor& x,
                                  const at::Tensor& A_pool, const at::Tensor& B_pool,
                                  const at::Tensor& indices, const at::Tensor& scales,
                                  const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                                  const std::optional<at::Tensor>& bad) {
  MultiArgs a;
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim [..., in], got a scalar");
  a.in = x.size(-1);
  a.dtype = to_dtype(x, op, "x");
  a.x2 = rows_view(x, a.in);
  a.T = a.x2.size(0);
  check_y(op, a, y, x, "x");
  TORCH_CHECK(y.dim() == x.dim(), op, ": y must have the same dims as x ([..., out] vs [..., in]),",
              " got y ", y.sizes(), " and x ", x.sizes());
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    TORCH_CHECK(y.size(d) == x.size(d), op, ": leading dims of y and x must match, got y ",
                y.sizes(), " and x ", x.sizes());
  check_slices(op, a, out_slices);
  check_pool_a(op, a, A_pool, out_slices.has_value());
  check_pool_b(op, a, B_pool);
  check_same_device_dtype(op, x, "x", A_pool, "A_pool");
  check_same_device_dtype(op, x, "x", B_pool, "B_pool");
  check_same_device_dtype(op, x, "x", y, "y");
  check_slot_args(op, a, x, indices, &scales, ranks);
  const NamedTensors reads = {{&x, "x"}, {&A_pool, "A_pool"}, {&B_pool, "B_pool"},
                              {&indices, "indices"}, {&scales, "scales"}, {&ranks, "ranks"}};
  check_reads(op, y, "y", reads);
  check_bad_count(op, bad, x, reads);
  if (bad.has_value()) check_no_overlap(op, *bad, "bad_index_count", y, "y");
  set_y(a, y);
  return a;
}

// lora_shrink(x, A_pool, indices, ranks, scale) -> u
inline MultiArgs check_shrink(const char* op, const at::Tensor& x, const at::Tensor& A_pool,
                              const at::Tensor& indices, const at::Tensor& ranks, double scale,
                              const std::optional<at::Tensor>& bad) {
  MultiArgs a;
  a.u_scale = f32_scale(op, "scale", scale);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim [..., in], got a scalar");
  a.in = x.size(-1);
  a.dtype = to_dtype(x, op, "x");
  a.x2 = rows_view(x, a.in);
  a.T = a.x2.size(0);
  TORCH_CHECK(A_pool.dim() == 3 || A_pool.dim() == 4, op,
              ": A_pool must be [S, r_max, in] or [n, S, r_max, in], got ", A_pool.sizes());
  a.n = A_pool.dim() == 4 ? A_pool.size(0) : 1;
  TORCH_CHECK(a.n >= 1 && a.n <= kMaxSlices, op, ": A_pool may hold 1 to ", kMaxSlices,
              " slices, got ", a.n);
  check_pool_a(op, a, A_pool, A_pool.dim() == 4);
  check_same_device_dtype(op, x, "x", A_pool, "A_pool");
  check_slot_args(op, a, x, indices, nullptr, ranks);
  check_bad_count(op, bad, x,
                  {{&x, "x"}, {&A_pool, "A_pool"}, {&indices, "indices"}, {&ranks, "ranks"}});
  return a;
}

// lora_expand_(y, u, B_pool, indices, scales, ranks, out_slices); u float32 or y's dtype (a
// 16-bit u is widened once: it is [T, r], small next to y).
inline MultiArgs check_expand(const char* op, const at::Tensor& y, const at::Tensor& u,
                              const at::Tensor& B_pool, const at::Tensor& indices,
                              const at::Tensor& scales, const at::Tensor& ranks,
                              at::OptionalIntArrayRef out_slices,
                              const std::optional<at::Tensor>& bad) {
  MultiArgs a;
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == y.scalar_type(), op,
              ": u must be float32 (lora_shrink's output) or y's dtype ", y.scalar_type(),
              ", got ", u.scalar_type());
  TORCH_CHECK(u.dim() == (out_slices.has_value() ? 3 : 2), op, ": u must be ",
              out_slices.has_value() ? "[n, T, r_max] with out_slices" : "[T, r_max]",
              ", got shape ", u.sizes());
  a.T = u.size(-2);
  a.r_max = u.size(-1);
  a.dtype = to_dtype(y, op, "y");
  check_y(op, a, y, u, "u");
  check_slices(op, a, out_slices);
  TORCH_CHECK(!out_slices.has_value() || u.size(0) == a.n, op, ": u must have n = ", a.n,
              " slices, got ", u.sizes());
  TORCH_CHECK(B_pool.dim() == 3, op, ": B_pool must be 3-D [S, out, r_max], got shape ",
              B_pool.sizes());
  a.S = B_pool.size(0);
  check_pool_b(op, a, B_pool);
  check_same_device_dtype(op, y, "y", B_pool, "B_pool");
  TORCH_CHECK(u.device() == y.device(), op, ": u is on ", u.device(), " but y is on ", y.device());
  check_slot_args(op, a, y, indices, &scales, ranks);
  const NamedTensors reads = {{&u, "u"}, {&B_pool, "B_pool"}, {&indices, "indices"},
                              {&scales, "scales"}, {&ranks, "ranks"}};
  check_reads(op, y, "y", reads);
  check_bad_count(op, bad, y, reads);
  if (bad.has_value()) check_no_overlap(op, *bad, "bad_index_count", y, "y");
  a.u = u.reshape({a.n, a.T, a.r_max}).to(at::kFloat).contiguous();
  set_y(a, y);
  return a;
}

}  // namespace lora_ext
