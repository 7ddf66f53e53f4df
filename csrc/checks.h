// Argument validation shared by the CPU and CUDA kernels (torch side only).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/accumulate.h>

#include <cmath>

#include "dtype.h"

namespace lora_ext {

// A scale for the fp32 kernels: finite as a float (a double above FLT_MAX would become inf there,
// and 0 * inf = NaN where the exact result is finite).
inline float f32_scale(const char* op, const char* name, double v) {
  const float f = static_cast<float>(v);
  TORCH_CHECK(std::isfinite(f), op, ": ", name, " must be finite in float32 (|", name,
              "| <= 3.4e38), got ", v);
  return f;
}

inline DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; supported are float32, float16 and bfloat16");
  }
}

inline void check_same_device_dtype(const char* op, const at::Tensor& ref, const char* ref_name,
                                    const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type(), "; dtypes must match");
}

// t as rows of `width` contiguous bytes at start + k * pitch (k < rows; pitch 0: one row), or false.
struct ByteRows {
  int64_t start = 0, width = 0, pitch = 0;
};
inline bool byte_rows(const at::Tensor& t, ByteRows& r) {
  const int64_t d = t.dim(), isz = t.element_size();
  if (d == 0 || (t.size(d - 1) != 1 && t.stride(d - 1) != 1)) return false;
  r.width = t.size(d - 1) * isz;
  r.start = t.storage_offset() * isz;
  int64_t rows = 1;
  for (int64_t i = d - 2; i >= 0; --i) {  // the leading dims must collapse to one row index
    if (t.size(i) == 1) continue;
    const int64_t s = t.stride(i) * isz;
    if (r.pitch == 0) r.pitch = s;
    else if (s != r.pitch * rows) return false;
    rows *= t.size(i);
  }
  return true;
}

// Disjoint column blocks of one row-major buffer (y = buf[:, :n], x = buf[:, n:]), which
// at::get_overlap_status calls TooHard: rows of one pitch, and their byte ranges modulo the pitch
// do not meet (neither wraps past a row end).
inline bool disjoint_columns(const at::Tensor& a, const at::Tensor& b) {
  ByteRows p, q;
  if (!byte_rows(a, p) || !byte_rows(b, q) || p.pitch == 0 || p.pitch != q.pitch) return false;
  const int64_t L = p.pitch, pa = p.start % L, qa = q.start % L;
  return pa + p.width <= L && qa + q.width <= L && (pa + p.width <= qa || qa + q.width <= pa);
}

inline void check_no_overlap(const char* op, const at::Tensor& out, const char* out_name,
                             const at::Tensor& in, const char* in_name) {
  if (!out.has_storage() || !in.has_storage() || out.numel() == 0 || in.numel() == 0 ||
      !out.storage().is_alias_of(in.storage()))
    return;
  const auto status = at::get_overlap_status(out, in);
  TORCH_CHECK(status == at::MemOverlapStatus::No ||
                  (status == at::MemOverlapStatus::TooHard && disjoint_columns(out, in)),
              op, ": ", out_name, " (written in place) shares memory with ", in_name,
              "; pass separate tensors");
}

// Validated view of lora_apply_'s arguments as 2-D problems:
//   x2 [T, in] (unit column stride), A [r, in], B [out, r] (contiguous), y2 [T, out].
// y2 aliases y when y can be viewed that way; otherwise y2 is a contiguous
// copy and the kernel's result must be copied back (copy_back == true).
struct LoraApplyArgs {
  at::Tensor y2, x2, A, B;
  int64_t T, in, out, r;
  DType dtype;
  bool copy_back;
};

inline LoraApplyArgs check_lora_apply(const char* op, const at::Tensor& y, const at::Tensor& x,
                                      const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.dim() == 2, op, ": A must be 2-D [r, in], got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 2, op, ": B must be 2-D [out, r], got shape ", B.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim [..., in], got a scalar");
  TORCH_CHECK(y.dim() == x.dim(), op, ": y must have the same number of dims as x ([..., out] vs",
              " [..., in]), got y ", y.sizes(), " and x ", x.sizes());
  const int64_t in = x.size(-1), r = A.size(0), out = B.size(0);
  TORCH_CHECK(r >= 1, op, ": rank r = A.size(0) must be >= 1, got A ", A.sizes());
  TORCH_CHECK(A.size(1) == in, op, ": A must be [r, in] with in = x.size(-1) = ", in, ", got A ",
              A.sizes());
  TORCH_CHECK(B.size(1) == r, op, ": B must be [out, r] with r = A.size(0) = ", r, ", got B ",
              B.sizes());
  TORCH_CHECK(y.size(-1) == out, op, ": y.size(-1) must equal out = B.size(0) = ", out,
              ", got y ", y.sizes());
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK(y.size(d) == x.size(d), op, ": leading dims of y and x must match, got y ",
                y.sizes(), " and x ", x.sizes());
  }
  DType dt = to_dtype(x, op, "x");
  check_same_device_dtype(op, x, "x", A, "A");
  check_same_device_dtype(op, x, "x", B, "B");
  check_same_device_dtype(op, x, "x", y, "y");
  TORCH_CHECK(at::has_internal_overlap(y) != at::MemOverlap::Yes, op,
              ": y has internal overlap (e.g. an expanded tensor); it cannot be written in place");
  check_no_overlap(op, y, "y", x, "x");
  check_no_overlap(op, y, "y", A, "A");
  check_no_overlap(op, y, "y", B, "B");

  LoraApplyArgs a;
  a.in = in;
  a.out = out;
  a.r = r;
  a.dtype = dt;
  // T from the leading dims, not reshape(-1, in): -1 is ambiguous when in == 0.
  a.T = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  a.x2 = x.reshape({a.T, in});
  if (a.x2.stride(1) != 1 || (a.x2.size(0) > 1 && a.x2.stride(0) < in)) a.x2 = a.x2.contiguous();
  a.A = A.contiguous();
  a.B = B.contiguous();
  // y must be written in place: use a 2-D view when its layout allows, else a copy.
  a.copy_back = false;
  if (y.dim() == 2 && y.stride(1) == 1 && (y.size(0) <= 1 || y.stride(0) >= out)) {
    a.y2 = y;
  } else if (y.is_contiguous()) {
    a.y2 = y.view({a.T, out});
  } else {
    a.y2 = y.reshape({a.T, out}).contiguous();
    a.copy_back = true;
  }
  return a;
}

// Validated 2-D views of lora_linear's arguments. The weight is [out, in], or [in, out] with
// fan_in_fan_out (transformers' Conv1D).
struct LoraLinearArgs {
  at::Tensor x2, A, B;
  int64_t T, in, out, r;
  DType dtype;
};

inline LoraLinearArgs check_lora_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                        const at::Tensor& B, double dropout_p,
                                        const c10::optional<at::Tensor>& seed, bool fan_in_fan_out) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., in], got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D, got shape ", weight.sizes());
  TORCH_CHECK(A.dim() == 2, op, ": A must be 2-D [r, in], got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 2, op, ": B must be 2-D [out, r], got shape ", B.sizes());
  const int64_t in = x.size(-1);
  const int64_t w_in = fan_in_fan_out ? weight.size(0) : weight.size(1);
  const int64_t out = fan_in_fan_out ? weight.size(1) : weight.size(0);
  TORCH_CHECK(w_in == in, op, ": weight ", weight.sizes(), (fan_in_fan_out ? " ([in, out])" : " ([out, in])"),
              " does not fit x.size(-1) = ", in);
  const int64_t r = A.size(0);
  TORCH_CHECK(r >= 1, op, ": rank r = A.size(0) must be >= 1, got A ", A.sizes());
  TORCH_CHECK(A.size(1) == in, op, ": A must be [r, in] = [", r, ", ", in, "], got ", A.sizes());
  TORCH_CHECK(B.size(0) == out && B.size(1) == r, op, ": B must be [out, r] = [", out, ", ", r,
              "], got ", B.sizes());
  DType dt = to_dtype(x, op, "x");
  check_same_device_dtype(op, x, "x", weight, "weight");
  check_same_device_dtype(op, x, "x", A, "A");
  check_same_device_dtype(op, x, "x", B, "B");
  if (bias.has_value() && bias->defined()) {
    check_same_device_dtype(op, x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be [out] = [", out,
                "], got ", bias->sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 &&
                    seed->scalar_type() == at::kLong && seed->device() == x.device(),
                op, ": dropout needs `seed`, a one-element int64 tensor on x's device");
  }
  LoraLinearArgs a;
  a.in = in;
  a.out = out;
  a.r = r;
  a.dtype = dt;
  a.T = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // not -1: in may be 0
  a.x2 = x.reshape({a.T, in}).contiguous();
  a.A = A.contiguous();
  a.B = B.contiguous();
  return a;
}

}  // namespace lora_ext
