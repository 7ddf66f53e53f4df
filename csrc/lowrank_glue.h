// Tensor-level glue of the single-adapter ops (lora_apply_, lora_linear fwd/bwd), written once
// and instantiated per backend. A Backend provides
//   static void run(DType, LowRankJob&, const at::Tensor& like);          // the low-rank kernel
//   static void dropout_rows(DType, const at::Tensor& src, at::Tensor& dst, double p,
//                            const at::Tensor& seed);                      // dst = keep ⊙ src
// Base GEMMs go through ATen (BLAS / cuBLAS); the low-rank shrink/expand, the dropout masks
// and the epilogues are ours.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "lowrank_job.h"

namespace lora_ext {

inline const int64_t* seed_ptr(const c10::optional<at::Tensor>& seed, double p) {
  return p > 0.0 ? seed->data_ptr<int64_t>() : nullptr;
}

template <class Backend>
void lora_apply_impl(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale) {
  LoraApplyArgs a = check_lora_apply("lora_apply_", y, x, A, B);
  // Nothing to add; in == 0 also gives x a null data pointer, which LowRankJob reads as "u given".
  if (a.T == 0 || a.out == 0 || a.in == 0) return;
  at::Tensor u = at::empty({a.T, a.r}, x.options().dtype(at::kFloat));
  LowRankJob j;
  j.x = a.x2.data_ptr();
  j.ldx = a.T > 1 ? a.x2.stride(0) : a.in;
  j.A = a.A.data_ptr();
  j.u = u.data_ptr<float>();
  j.B = a.B.data_ptr();
  j.y = a.y2.data_ptr();
  j.ldy = a.T > 1 ? a.y2.stride(0) : a.out;
  j.T = a.T;
  j.in = a.in;
  j.out = a.out;
  j.r = a.r;
  j.scale = f32_scale("lora_apply_", "scale", scale);
  Backend::run(a.dtype, j, x);
  if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
}

// Backends whose expand_first() is true (CPU; CUDA with LORA_EXT_CUDA_EXPAND_FIRST=1) write the
// LoRA term (and bias) first and let the base GEMM accumulate into it with beta = 1: y and dx are
// then read once less by lora_ext's kernels. Otherwise the GEMM runs first (bias in its epilogue)
// and the expand adds the LoRA term.
// Outputs are fresh tensors, returned with at::_unsafe_view (as aten's matmul does) so they are
// not views: FSDP2 and autograd may then modify them in place.
// (y [..., out], u [T, r] fp32): y = x W^T + bias + scale * (keep ⊙ x) A^T B^T; u is saved
// for backward (the only per-token state besides x; the dropout mask is regenerated).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_impl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out) {
  LoraLinearArgs a = check_lora_linear("lora_linear", x, weight, bias, A, B, dropout_p, seed,
                                       fan_in_fan_out);
  const at::Tensor wt = fan_in_fan_out ? weight : weight.t();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool first = Backend::expand_first() && a.T > 0 && a.in > 0 && a.out > 0;
  at::Tensor y2 = first ? at::empty({a.T, a.out}, x.options())
                  : has_bias ? at::addmm(*bias, a.x2, wt) : at::mm(a.x2, wt);
  at::Tensor u = at::empty({a.T, a.r}, x.options().dtype(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = a.out;
  if (a.T == 0) return {at::_unsafe_view(y2, shape), u};
  if (a.in == 0) return {at::_unsafe_view(y2, shape), u.zero_()};  // x A^T is empty: no LoRA term
  const at::Tensor b = first && has_bias ? bias->contiguous() : at::Tensor();
  LowRankJob j;
  j.x = a.x2.data_ptr();
  j.ldx = a.in;
  j.A = a.A.data_ptr();
  j.u = u.data_ptr<float>();
  j.B = a.B.data_ptr();
  j.y = y2.data_ptr();
  j.ldy = a.out;
  j.T = a.T;
  j.in = a.in;
  j.out = a.out;
  j.r = a.r;
  j.scale = f32_scale("lora_linear", "scale", scale);
  j.dropout_p = static_cast<float>(dropout_p);
  j.seed = seed_ptr(seed, dropout_p);
  j.mask_x = true;
  j.overwrite_y = first;  // y = bias + LoRA term, then the base GEMM adds x W^T (beta = 1)
  j.bias = b.defined() ? b.data_ptr() : nullptr;
  Backend::run(a.dtype, j, x);
  if (first) y2.addmm_(a.x2, wt);
  return {at::_unsafe_view(y2, shape), u};
}

// a[T, p]^T b[T, q] -> [p, q] fp32, the operands widened to fp32 a block of rows at a time (so
// the temporaries stay small). Used for the fp16 weight gradients: the forward keeps u and gB
// in fp32, and rounding s * u or s * gB to fp16 would turn large values into inf.
inline at::Tensor mm_tn_f32(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kRows = 4096;
  at::Tensor out = at::zeros({a.size(1), b.size(1)}, a.options().dtype(at::kFloat));
  for (int64_t t0 = 0; t0 < a.size(0); t0 += kRows) {
    const int64_t n = std::min(kRows, a.size(0) - t0);
    out.addmm_(a.narrow(0, t0, n).t().to(at::kFloat), b.narrow(0, t0, n).to(at::kFloat));
  }
  return out;
}

// Gradients of lora_linear for output_mask = [x, weight, A, B] (undefined where not asked).
// With g = grad [T, out], gB = g B [T, r] (fp32):
//   dx = g W + scale * keep ⊙ (gB A),  dA = scale * gB^T (keep ⊙ x),  dB = scale * g^T u,
//   dW = g^T x (only if the weight is trainable).
// Backends with kFusedWeightGrads (CPU) accumulate dA and dB in the same pass over the tokens as
// gB and the dx epilogue (csrc/lowrank_job.h), so g and x are read once; the others use GEMMs.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& u, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out, std::array<bool, 4> output_mask) {
  LoraLinearArgs a = check_lora_linear("lora_linear_backward", x, weight, c10::nullopt, A, B,
                                       dropout_p, seed, fan_in_fan_out);
  check_same_device_dtype("lora_linear_backward", x, "x", grad, "grad");
  TORCH_CHECK(grad.numel() == a.T * a.out && grad.size(-1) == a.out,
              "lora_linear_backward: grad must be [..., out] with out = ", a.out, ", got ", grad.sizes());
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.dim() == 2 && u.size(0) == a.T && u.size(1) == a.r,
              "lora_linear_backward: u must be the fp32 [T, r] saved by the forward, got ", u.sizes());
  const at::Tensor g2 = grad.reshape({a.T, a.out}).contiguous();  // not -1: out may be 0
  const at::Tensor gB = at::empty({a.T, a.r}, x.options().dtype(at::kFloat));
  const bool fuse = Backend::kFusedWeightGrads && (output_mask[2] || output_mask[3]);
  const auto f32 = x.options().dtype(at::kFloat);
  // fused: unscaled fp32 dA [r, in] and dB^T [r, out], zero when there is nothing to sum
  const bool empty_sum = a.T == 0 || a.out == 0;
  at::Tensor dA32 = fuse && output_mask[2] ? (empty_sum ? at::zeros({a.r, a.in}, f32) : at::empty({a.r, a.in}, f32))
                                           : at::Tensor();
  at::Tensor dBt32 = fuse && output_mask[3] ? (a.T == 0 ? at::zeros({a.r, a.out}, f32) : at::empty({a.r, a.out}, f32))
                                            : at::Tensor();
  at::Tensor dx, dW, dA, dB;
  const at::Tensor w_in = fan_in_fan_out ? weight.t() : weight;  // [out, in]: dx = g W
  const bool first = Backend::expand_first() && output_mask[0] && a.T > 0 && a.out > 0 && a.in > 0;
  if (output_mask[0]) dx = first ? at::empty({a.T, a.in}, x.options()) : at::mm(g2, w_in);
  if (a.T > 0 && a.out == 0) {
    gB.zero_();  // g B is an empty sum
  } else if (a.T > 0) {
    const at::Tensor Bt = a.B.t().contiguous();  // [r, out]: gB = g Bt^T
    const at::Tensor At = a.A.t().contiguous();  // [in, r]: dx += s gB At^T
    LowRankJob j;
    j.x = g2.data_ptr();
    j.ldx = a.out;
    j.A = Bt.data_ptr();
    j.u = gB.data_ptr<float>();
    j.T = a.T;
    j.in = a.out;
    j.r = a.r;
    j.dropout_p = static_cast<float>(dropout_p);
    j.seed = seed_ptr(seed, dropout_p);
    if (output_mask[0]) {
      j.B = At.data_ptr();
      j.y = dx.data_ptr();
      j.ldy = a.in;
      j.out = a.in;
      j.scale = f32_scale("lora_linear_backward", "scale", scale);
      j.mask_y = true;
      j.overwrite_y = first;
    }
    if (dA32.defined() && a.in > 0) {
      j.xf = a.x2.data_ptr();
      j.ldxf = a.in;
      j.nf = a.in;
      j.mask_xf = true;
      j.dA = dA32.data_ptr<float>();
    }
    if (dBt32.defined()) {
      j.uf = u.data_ptr<float>();
      j.dBt = dBt32.data_ptr<float>();
    }
    Backend::run(a.dtype, j, x);
    if (first) dx.addmm_(g2, w_in);
  } else if (output_mask[0]) {
    dx.zero_();
  }
  if (fuse) {
    if (output_mask[2]) dA = dA32.mul_(scale).to(x.scalar_type());
    if (output_mask[3]) dB = dBt32.t().contiguous().mul_(scale).to(x.scalar_type());
  }
  if (output_mask[2] && !fuse) {
    at::Tensor xd = a.x2;
    if (dropout_p > 0.0 && a.T > 0) {
      xd = at::empty_like(a.x2);
      Backend::dropout_rows(a.dtype, a.x2, xd, dropout_p, *seed);
    }
    dA = x.scalar_type() == at::kHalf ? mm_tn_f32(gB, xd).mul_(scale).to(at::kHalf)
                                      : at::mm(gB.mul(scale).to(x.scalar_type()).t(), xd);
  }
  if (output_mask[3] && !fuse)
    dB = x.scalar_type() == at::kHalf ? mm_tn_f32(g2, u).mul_(scale).to(at::kHalf)
                                      : at::mm(g2.t(), u.mul(scale).to(x.scalar_type()));
  if (output_mask[1]) dW = fan_in_fan_out ? at::mm(a.x2.t(), g2) : at::mm(g2.t(), a.x2);
  if (dx.defined()) dx = at::_unsafe_view(dx, x.sizes());
  return {dx, dW, dA, dB};
}

}  // namespace lora_ext
