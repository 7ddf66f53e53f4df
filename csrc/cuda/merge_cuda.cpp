// CUDA launchers of merge_, remerge_, merge_points_ and dora_norm: validate (../merge_glue.h),
// build the padded fp32 operands L and R (small: Rt * (P + Q) floats) and launch.
#include "../dora_math.h"
#include "../merge_glue.h"
#include "guard.h"
#include "ops_cuda.h"

namespace lora_ext::cuda {
namespace {

constexpr int64_t kRowPad = 64;   // multiple of every tile's rows
constexpr int64_t kColPad = 256;  // multiple of every tile's columns
constexpr int64_t kDoraChunk = dora_math::kDoraChunk;

void check_cuda(const char* op, const at::Tensor& W) {
  TORCH_CHECK(on_device(W), op, ": CUDA kernel called with weight on ", W.device());
}

void set_operands(const MergeOperands& o, const float*& L, const float*& R, int64_t& Rt,
                  int64_t& ldr) {
  Rt = o.Rt;
  L = Rt ? o.L.data_ptr<float>() : nullptr;
  R = Rt ? o.R.data_ptr<float>() : nullptr;
  ldr = Rt ? o.R.size(1) : 0;
}

}  // namespace

void merge_cuda(at::Tensor weight, at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                bool fan_in_fan_out) {
  const char* op = "merge_";
  WeightView v = weight_view(op, weight);
  check_cuda(op, weight);
  const bool copy = !v.view.defined();
  at::Tensor work = copy ? weight.contiguous() : v.view;
  if (copy) {
    v.P = work.size(0);
    v.Q = work.size(1);
    v.ld = v.Q;
  }
  const DeviceGuard guard(weight.device());
  const MergeOperands o =
      merge_operands(op, weight, fan_in_fan_out, v.transposed, A, B, scales, kRowPad, kColPad);
  if (o.Rt == 0 || weight.numel() == 0) return;
  MergeParams p{};
  p.w = work.data_ptr();
  p.P = v.P;
  p.Q = v.Q;
  p.ld = v.ld;
  set_operands(o, p.L, p.R, p.Rt, p.ldr);
  p.exact = false;
  LORA_EXT_CUDA_CHECK(merge(to_dtype(weight, op, "weight"), p, current_stream(weight)));
  if (copy) weight.copy_(work);
}

void remerge_cuda(at::Tensor weight, at::Tensor codes, at::Tensor fails, int64_t bits,
                  at::TensorList A_old, at::TensorList B_old, at::ArrayRef<double> s_old,
                  at::TensorList A_new, at::TensorList B_new, at::ArrayRef<double> s_new,
                  bool fan_in_fan_out) {
  const char* op = "remerge_";
  check_remerge(op, weight, codes, fails, bits);
  check_cuda(op, weight);
  const DeviceGuard guard(weight.device());
  const MergeOperands o =
      merge_operands(op, weight, fan_in_fan_out, false, A_old, B_old, s_old, kRowPad, kColPad);
  const MergeOperands n =
      merge_operands(op, weight, fan_in_fan_out, false, A_new, B_new, s_new, kRowPad, kColPad);
  if ((o.Rt == 0 && n.Rt == 0) || weight.numel() == 0) return;
  MergeParams p{};
  p.w = weight.data_ptr();
  p.P = weight.size(0);
  p.Q = weight.size(1);
  p.ld = p.Q;
  set_operands(n, p.L, p.R, p.Rt, p.ldr);
  set_operands(o, p.Lo, p.Ro, p.Rto, p.ldro);
  p.codes = reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>());
  p.fails = reinterpret_cast<uint32_t*>(fails.data_ptr<int32_t>());
  p.bits = static_cast<int>(bits);
  p.exact = true;
  LORA_EXT_CUDA_CHECK(merge(to_dtype(weight, op, "weight"), p, current_stream(weight)));
}

void merge_points_cuda(at::Tensor weight, const at::Tensor& idx, const at::Tensor& vals,
                       at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                       bool fan_in_fan_out) {
  const char* op = "merge_points_";
  check_cuda(op, weight);
  const DeviceGuard guard(weight.device());
  check_points(op, weight, idx, vals, /*check_range=*/!capturing());
  const MergeOperands o = merge_operands(op, weight, fan_in_fan_out, false, A, B, scales, 1, 1);
  if (idx.numel() == 0) return;
  const at::Tensor i = idx.contiguous(), v = vals.contiguous();
  MergePointsParams p{};
  p.w = weight.data_ptr();
  p.P = weight.size(0);
  p.Q = weight.size(1);
  p.idx = i.data_ptr<int64_t>();
  p.vals = v.data_ptr();
  p.n = i.numel();
  set_operands(o, p.L, p.R, p.Rt, p.ldr);
  LORA_EXT_CUDA_CHECK(merge_points(to_dtype(weight, op, "weight"), p, current_stream(weight)));
}

at::Tensor dora_norm_cuda(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                          double scale, bool fan_in_fan_out) {
  const char* op = "dora_norm";
  DoraArgs a = dora_args(op, weight, A, B, scale, fan_in_fan_out);
  check_cuda(op, weight);
  const DeviceGuard guard(weight.device());
  dora_operands(op, a, weight, A, B, scale, fan_in_fan_out, kRowPad, kColPad);
  at::Tensor out = at::empty({a.out}, weight.options().dtype(at::kFloat));
  if (a.out == 0) return out;
  if (a.in == 0) return out.zero_();
  DoraParams p{};
  p.w = a.view.data_ptr();
  p.P = a.P;
  p.Q = a.Q;
  p.ld = a.ld;
  set_operands(a.ops, p.L, p.R, p.Rt, p.ldr);
  p.out = out.data_ptr<float>();
  p.chunks = (a.in + kDoraChunk - 1) / kDoraChunk;
  at::Tensor ws;  // the chunks' partials (shapes only: capture safe)
  if (p.chunks > 1) {
    ws = at::empty({p.chunks, a.out}, out.options());
    p.ws = ws.data_ptr<float>();
  }
  p.rows = a.rows;
  LORA_EXT_CUDA_CHECK(dora_norm(a.dtype, p, current_stream(weight)));
  return out;
}

at::Tensor merge_code_failures_cuda(const at::Tensor& w0, const at::Tensor& s) {
  const char* op = "merge_code_failures";
  check_code_failures(op, w0, s);
  TORCH_CHECK(on_device(w0), op, ": CUDA kernel called with w0 on ", w0.device());
  const DeviceGuard guard(w0.device());
  const at::Tensor w = w0.contiguous(), sc = s.contiguous();
  at::Tensor out = at::zeros({4}, w0.options().dtype(at::kLong));
  LORA_EXT_CUDA_CHECK(cuda::merge_code_failures(
      to_dtype(w0, op, "w0"), w.data_ptr(), sc.data_ptr<float>(), w.numel(),
      reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()), sm_count(w0),
      current_stream(w0)));
  return out;
}

}  // namespace lora_ext::cuda
