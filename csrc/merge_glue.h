// Validation and operand preparation of the merge ops (torch side, shared by the
// CPU and CUDA launchers).
//
// A weight W is viewed as a [P, Q] row-major matrix with unit column stride:
//   fan_in_fan_out == false: W [out, in],  W += s * B A
//   fan_in_fan_out == true:  W [in, out],  W += s * (B A)^T   (transformers Conv1D, embeddings)
// For adapters a = 0..n-1 (A_a [r_a, in], B_a [out, r_a], scale s_a) the kernels get
// fp32 operands over the concatenated rank Rt = sum r_a:
//   L [P, Rt], R [Rt, Q] with S = L R, where the factor coming from B is fl32(s_a * B_a)
// and the one coming from A is A_a (both exact conversions to fp32 otherwise). Whatever
// the layout, each element's product terms are the same fp32 numbers in the same order,
// so S (and the merged bits) do not depend on fan_in_fan_out or on the device.
// L's rows are zero padded to a multiple of row_pad and R's columns to col_pad so that
// the CPU micro-tiles never read out of bounds.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"

namespace lora_ext {

struct MergeOperands {
  // fp32, contiguous: L [Ppad, Rt]; R [Rt, Qpad], or with panels > 0 R [Qpad / panels, Rt,
  // panels] (column panel t holds R[:, t * panels : (t + 1) * panels], read contiguously).
  // Undefined when Rt == 0.
  at::Tensor L, R;
  int64_t Rt = 0;
};

inline void check_adapter_dtype(const char* op, const at::Tensor& t, const char* name, size_t i) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name, "[", i,
              "] has dtype ", st, "; supported are float32, float16 and bfloat16");
}

// The adapters' checks against the weight [out, in] ([in, out] with fifo): fp32 scales, total rank.
struct AdapterList {
  std::vector<float> scales;
  int64_t Rt = 0;
};

inline AdapterList check_adapters(const char* op, const at::Tensor& W, bool fifo, at::TensorList As,
                                  at::TensorList Bs, at::ArrayRef<double> scales) {
  TORCH_CHECK(As.size() == Bs.size() && As.size() == scales.size(), op,
              ": A, B and scales must have the same length, got ", As.size(), ", ", Bs.size(),
              " and ", scales.size());
  TORCH_CHECK(W.dim() == 2, op, ": weight must be 2-D, got shape ", W.sizes());
  const int64_t out = W.size(fifo ? 1 : 0), in = W.size(fifo ? 0 : 1);
  AdapterList l;
  l.scales.resize(As.size());
  for (size_t i = 0; i < As.size(); ++i) {
    const at::Tensor& A = As[i];
    const at::Tensor& B = Bs[i];
    TORCH_CHECK(A.dim() == 2, op, ": A[", i, "] must be 2-D [r, in], got shape ", A.sizes());
    TORCH_CHECK(B.dim() == 2, op, ": B[", i, "] must be 2-D [out, r], got shape ", B.sizes());
    const int64_t r = A.size(0);
    TORCH_CHECK(r >= 1, op, ": rank r = A[", i, "].size(0) must be >= 1, got A ", A.sizes());
    TORCH_CHECK(A.size(1) == in, op, ": A[", i, "] must be [r, in] with in = ", in,
                (fifo ? " (weight is [in, out] with fan_in_fan_out)" : " (weight is [out, in])"),
                ", got A ", A.sizes(), " for weight ", W.sizes());
    TORCH_CHECK(B.size(0) == out && B.size(1) == r, op, ": B[", i, "] must be [out, r] = [", out,
                ", ", r, "], got B ", B.sizes(), " for weight ", W.sizes());
    check_adapter_dtype(op, A, "A", i);
    check_adapter_dtype(op, B, "B", i);
    TORCH_CHECK(A.device() == W.device() && B.device() == W.device(), op, ": A[", i, "] (",
                A.device(), ") and B[", i, "] (", B.device(), ") must be on the weight's device ",
                W.device());
    l.scales[i] = f32_scale(op, ("scales[" + std::to_string(i) + "]").c_str(), scales[i]);
    l.Rt += r;
  }
  return l;
}

// Checks the adapters against the weight and builds L and R.
// `fifo` is the caller's fan_in_fan_out for W; `transposed` says that the kernels see W^T
// (a [P, Q] = W^T view, see weight_view).
inline MergeOperands merge_operands(const char* op, const at::Tensor& W, bool fifo, bool transposed,
                                    at::TensorList As, at::TensorList Bs,
                                    at::ArrayRef<double> scales, int64_t row_pad,
                                    int64_t col_pad, int64_t panels = 0) {
  const AdapterList al = check_adapters(op, W, fifo, As, Bs, scales);
  const std::vector<float>& fs = al.scales;
  const int64_t Rt = al.Rt;
  const bool kfifo = fifo != transposed;  // layout the kernels see
  const int64_t P = W.size(transposed ? 1 : 0), Q = W.size(transposed ? 0 : 1);
  MergeOperands o;
  o.Rt = Rt;
  if (Rt == 0) return o;
  // Written in place, converted on the way (few launches: on a GPU each costs host time): the
  // adapters' columns of L / rows of R, then the padding zeroed.
  const int64_t Ppad = (P + row_pad - 1) / row_pad * row_pad;
  const int64_t Qpad = (Q + col_pad - 1) / col_pad * col_pad;
  o.L = at::empty({Ppad, Rt}, W.options().dtype(at::kFloat));
  o.R = at::empty({Rt, Qpad}, W.options().dtype(at::kFloat));
  if (Ppad > P) o.L.narrow(0, P, Ppad - P).zero_();
  if (Qpad > Q) o.R.narrow(1, Q, Qpad - Q).zero_();
  int64_t off = 0;
  for (size_t i = 0; i < As.size(); ++i) {
    const int64_t r = As[i].size(0);
    at::Tensor l = o.L.narrow(0, 0, P).narrow(1, off, r);  // [P, r]
    at::Tensor rr = o.R.narrow(0, off, r).narrow(1, 0, Q);  // [r, Q]
    const at::Scalar s(static_cast<double>(fs[i]));  // fl32(s * B): B exactly in fp32, times s
    if (kfifo) {
      l.copy_(As[i].t());
      rr.copy_(Bs[i].t()).mul_(s);
    } else {
      l.copy_(Bs[i]).mul_(s);
      rr.copy_(As[i]);
    }
    off += r;
  }
  if (panels > 0) o.R = o.R.view({Rt, Qpad / panels, panels}).permute({1, 0, 2}).contiguous();
  return o;
}

// The weight of a merge op as a [P, Q] view with unit column stride; a column-major
// weight is used as W^T (transposed == true, no copy). `view` is undefined when neither
// dimension has unit stride: the caller then works on a contiguous copy.
struct WeightView {
  at::Tensor view;
  bool transposed = false;
  int64_t P = 0, Q = 0, ld = 0;
};

inline WeightView weight_view(const char* op, const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2, op, ": weight must be 2-D, got shape ", W.sizes());
  to_dtype(W, op, "weight");
  TORCH_CHECK(at::has_internal_overlap(W) != at::MemOverlap::Yes, op,
              ": weight has internal overlap (e.g. an expanded tensor); it cannot be written in "
              "place");
  WeightView v;
  if (W.stride(1) == 1 || W.size(1) <= 1) {
    v.view = W;
  } else if (W.stride(0) == 1 || W.size(0) <= 1) {
    v.view = W.t();
    v.transposed = true;
  }
  if (v.view.defined()) {
    v.P = v.view.size(0);
    v.Q = v.view.size(1);
    v.ld = v.P > 1 ? v.view.stride(0) : v.Q;
  }
  return v;
}

// dora_norm's arguments, checked (every error names dora_norm and the argument): the weight as a
// [P, Q] view with unit column stride (read in place; a column-major weight as W^T; any other
// layout is copied, as merge_ does) and where `in` runs (rows: along Q, one norm per row of the
// view; else along P, one per column). dora_operands adds merge_'s fp32 operands of the adapter
// (Rt = r; none when r == 0).
struct DoraArgs {
  at::Tensor view;
  int64_t P = 0, Q = 0, ld = 0, out = 0, in = 0;
  bool rows = true, transposed = false;
  DType dtype = DType::F32;
  MergeOperands ops;
};

inline DoraArgs dora_args(const char* op, const at::Tensor& W, const at::Tensor& A,
                          const at::Tensor& B, double scale, bool fifo) {
  const char* layout = fifo ? "[in, out] (fan_in_fan_out)" : "[out, in]";
  TORCH_CHECK(W.dim() == 2, op, ": weight must be 2-D ", layout, ", got shape ", W.sizes());
  TORCH_CHECK(A.dim() == 2, op, ": A must be 2-D [r, in], got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 2, op, ": B must be 2-D [out, r], got shape ", B.sizes());
  DoraArgs a;
  a.dtype = to_dtype(W, op, "weight");
  a.out = W.size(fifo ? 1 : 0);
  a.in = W.size(fifo ? 0 : 1);
  const int64_t r = A.size(0);
  TORCH_CHECK(A.size(1) == a.in, op, ": A must be [r, in] with in = ", a.in, " (weight ", W.sizes(),
              " is ", layout, "), got A ", A.sizes());
  TORCH_CHECK(B.size(0) == a.out && B.size(1) == r, op, ": B must be [out, r] = [", a.out, ", ", r,
              "] (out from weight ", W.sizes(), " ", layout, ", r = A.size(0)), got B ", B.sizes());
  for (const auto& [t, name] : {std::pair{&A, "A"}, std::pair{&B, "B"}}) {
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                " has dtype ", st, "; supported are float32, float16 and bfloat16");
    TORCH_CHECK(t->device() == W.device(), op, ": ", name, " is on ", t->device(),
                " but weight is on ", W.device(), "; all tensors must be on one device");
  }
  f32_scale(op, "scale", scale);
  if (W.stride(1) == 1 || W.size(1) <= 1) {
    a.view = W;
  } else if (W.stride(0) == 1 || W.size(0) <= 1) {
    a.view = W.t();
    a.transposed = true;
  } else {
    a.view = W.contiguous();
  }
  a.P = a.view.size(0);
  a.Q = a.view.size(1);
  a.ld = a.P > 1 ? a.view.stride(0) : a.Q;
  a.rows = fifo == a.transposed;
  return a;
}

inline void dora_operands(const char* op, DoraArgs& a, const at::Tensor& W, const at::Tensor& A,
                          const at::Tensor& B, double scale, bool fifo, int64_t row_pad,
                          int64_t col_pad, int64_t panels = 0) {
  if (A.size(0) > 0)
    a.ops = merge_operands(op, W, fifo, a.transposed, {A}, {B}, {scale}, row_pad, col_pad, panels);
}

// remerge_'s state tensors: codes (k-bit codes of W0, int32 words) and fails (one bit
// per element, int32 words). Both contiguous, on W's device, at least as long as needed.
inline void check_remerge(const char* op, const at::Tensor& W, const at::Tensor& codes,
                          const at::Tensor& fails, int64_t bits) {
  TORCH_CHECK(W.dim() == 2, op, ": weight must be 2-D, got shape ", W.sizes());
  to_dtype(W, op, "weight");
  TORCH_CHECK(W.is_contiguous(), op, ": weight must be contiguous for an exact merge, got strides ",
              W.strides());
  TORCH_CHECK(bits == 0 || bits == 1 || bits == 2 || bits == 4, op,
              ": bits must be 0, 1, 2 or 4, got ", bits);
  const int64_t n = W.numel();
  auto check_words = [&](const at::Tensor& t, const char* name, int64_t need) {
    TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == W.device(), op, ": ", name, " is on ", t.device(),
                " but weight is on ", W.device());
    TORCH_CHECK(t.is_contiguous() && t.numel() >= need, op, ": ", name,
                " must be contiguous with at least ", need, " elements, got ", t.sizes());
    check_no_overlap(op, W, "weight", t, name);
  };
  check_words(codes, "codes", (n * bits + 31) / 32);
  check_words(fails, "fails", (n + 31) / 32);
  check_no_overlap(op, codes, "codes", fails, "fails");
}

// merge_points_'s indices (int64, flat into the contiguous weight) and values. check_range:
// also check on the host that every index lies in range (a device sync on CUDA, so the CUDA
// launcher skips it while a CUDA graph is captured; its kernel never touches an element for
// an out-of-range index).
inline void check_points(const char* op, const at::Tensor& W, const at::Tensor& idx,
                         const at::Tensor& vals, bool check_range) {
  TORCH_CHECK(W.dim() == 2, op, ": weight must be 2-D, got shape ", W.sizes());
  to_dtype(W, op, "weight");
  TORCH_CHECK(W.is_contiguous(), op, ": weight must be contiguous, got strides ", W.strides());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op,
              ": idx must be a 1-D int64 tensor, got ", idx.scalar_type(), " ", idx.sizes());
  check_same_device_dtype(op, W, "weight", vals, "vals");
  TORCH_CHECK(idx.device() == W.device(), op, ": idx is on ", idx.device(), " but weight is on ",
              W.device());
  TORCH_CHECK(vals.dim() == 1 && vals.size(0) == idx.size(0), op,
              ": vals must be 1-D with one value per index, got ", vals.sizes(), " for idx ",
              idx.sizes());
  if (check_range && idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    TORCH_CHECK(l >= 0 && h < W.numel(), op, ": idx must lie in [0, ", W.numel(), "), got [", l,
                ", ", h, "]");
  }
  check_no_overlap(op, W, "weight", vals, "vals");
}

// merge_code_failures's inputs: w0 (a weight dtype) and s (fp32) with as many elements, one device.
inline void check_code_failures(const char* op, const at::Tensor& w0, const at::Tensor& s) {
  to_dtype(w0, op, "w0");
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": s must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.numel() == w0.numel(), op, ": s must have one sum per element of w0 (", w0.numel(),
              "), got ", s.numel());
  TORCH_CHECK(s.device() == w0.device(), op, ": s is on ", s.device(), " but w0 is on ",
              w0.device());
}

}  // namespace lora_ext
