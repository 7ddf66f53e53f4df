// CUDA launchers of merge_, remerge_, merge_points_ and dora_norm: validate (../merge_glue.h),
// describe the adapters' factors where they lie (launch.h's Factors: no operand copies, no
// launches besides the kernel's) and launch.
#include "../dora_math.h"
#include "../merge_glue.h"
#include "guard.h"
#include "ops_cuda.h"

namespace lora_ext::cuda {
namespace {

constexpr int64_t kDoraChunk = dora_math::kDoraChunk;

void check_cuda(const char* op, const at::Tensor& W) {
  TORCH_CHECK(on_device(W), op, ": CUDA kernel called with weight on ", W.device());
}

bool same_storage(const at::Tensor& a, const at::Tensor& b) {
  return a.has_storage() && b.has_storage() && a.numel() > 0 && b.numel() > 0 &&
         a.storage().is_alias_of(b.storage());
}

DType factor_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? DType::BF16
         : t.scalar_type() == at::kHalf   ? DType::F16
                                          : DType::F32;
}

FactorPiece piece(const at::Tensor& l, int64_t ls0, int64_t ls1, const at::Tensor& r, int64_t rs0,
                  int64_t rs1, int64_t rank, float scale, int scaled) {
  FactorPiece pc{};
  pc.l = l.data_ptr();
  pc.r = r.data_ptr();
  pc.ls0 = ls0, pc.ls1 = ls1, pc.rs0 = rs0, pc.rs1 = rs1, pc.rank = rank;
  pc.scale = scale;
  pc.scaled = scaled;
  pc.lt = factor_dtype(l);
  pc.rt = factor_dtype(r);
  const int64_t esz = r.element_size();
  pc.vec_r = rs1 == 1 && (rank == 1 || rs0 % 4 == 0) &&
             reinterpret_cast<uintptr_t>(pc.r) % static_cast<uintptr_t>(4 * esz) == 0;
  return pc;
}

// The adapters' factors of S for a weight seen as [P, Q] (transposed: W^T), checked. They are
// read in place; `keep` holds the fp32 operands built instead (../merge_glue.h) when there
// are more adapters than pieces or a factor shares memory with the weight it updates.
struct FactorArgs {
  Factors f{};
  MergeOperands keep;
};

FactorArgs factor_args(const char* op, const at::Tensor& W, bool fifo, bool transposed,
                       at::TensorList As, at::TensorList Bs, at::ArrayRef<double> scales) {
  const AdapterList al = check_adapters(op, W, fifo, As, Bs, scales);
  FactorArgs a;
  a.f.Rt = al.Rt;
  bool direct = As.size() <= static_cast<size_t>(kMaxPieces);
  for (size_t i = 0; direct && i < As.size(); ++i)
    direct = !same_storage(W, As[i]) && !same_storage(W, Bs[i]);
  if (!direct) {
    a.keep = merge_operands(op, W, fifo, transposed, As, Bs, scales, 1, 1);
    if (a.keep.Rt > 0) {
      a.f.n = 1;
      a.f.pc[0] = piece(a.keep.L, a.keep.Rt, 1, a.keep.R, a.keep.R.size(1), 1, a.keep.Rt, 1.f, 0);
    }
    return a;
  }
  const bool kfifo = fifo != transposed;  // layout the kernels see
  for (size_t i = 0; i < As.size(); ++i) {
    const at::Tensor& A = As[i];
    const at::Tensor& B = Bs[i];
    const int64_t r = A.size(0);
    a.f.pc[a.f.n++] =
        kfifo ? piece(A, A.stride(1), A.stride(0), B, B.stride(1), B.stride(0), r, al.scales[i], 2)
              : piece(B, B.stride(0), B.stride(1), A, A.stride(0), A.stride(1), r, al.scales[i], 1);
  }
  return a;
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
  const FactorArgs o = factor_args(op, weight, fan_in_fan_out, v.transposed, A, B, scales);
  if (o.f.Rt == 0 || weight.numel() == 0) return;
  MergeParams p{};
  p.w = work.data_ptr();
  p.P = v.P;
  p.Q = v.Q;
  p.ld = v.ld;
  p.f = o.f;
  p.exact = false;
  p.num_sms = sm_count(weight);
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
  const FactorArgs o = factor_args(op, weight, fan_in_fan_out, false, A_old, B_old, s_old);
  const FactorArgs n = factor_args(op, weight, fan_in_fan_out, false, A_new, B_new, s_new);
  if ((o.f.Rt == 0 && n.f.Rt == 0) || weight.numel() == 0) return;
  MergeParams p{};
  p.w = weight.data_ptr();
  p.P = weight.size(0);
  p.Q = weight.size(1);
  p.ld = p.Q;
  p.f = n.f;
  p.fo = o.f;
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
  const FactorArgs o = factor_args(op, weight, fan_in_fan_out, false, A, B, scales);
  if (idx.numel() == 0) return;
  const at::Tensor i = idx.contiguous(), v = vals.contiguous();
  MergePointsParams p{};
  p.w = weight.data_ptr();
  p.P = weight.size(0);
  p.Q = weight.size(1);
  p.idx = i.data_ptr<int64_t>();
  p.vals = v.data_ptr();
  p.n = i.numel();
  p.f = o.f;
  LORA_EXT_CUDA_CHECK(merge_points(to_dtype(weight, op, "weight"), p, current_stream(weight)));
}

at::Tensor dora_norm_cuda(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                          double scale, bool fan_in_fan_out) {
  const char* op = "dora_norm";
  DoraArgs a = dora_args(op, weight, A, B, scale, fan_in_fan_out);
  check_cuda(op, weight);
  const DeviceGuard guard(weight.device());
  const FactorArgs o = A.size(0) > 0 ? factor_args(op, weight, fan_in_fan_out, a.transposed, {A},
                                                   {B}, {scale})
                                     : FactorArgs{};
  at::Tensor out = at::empty({a.out}, weight.options().dtype(at::kFloat));
  if (a.out == 0) return out;
  if (a.in == 0) return out.zero_();
  DoraParams p{};
  p.w = a.view.data_ptr();
  p.P = a.P;
  p.Q = a.Q;
  p.ld = a.ld;
  p.f = o.f;
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
