// CUDA launchers of multi_lora_, lora_shrink and lora_expand_: validate, allocate the fp32
// split-K partials and the int workspace (sizes from shapes only, so CUDA-graph capture
// works and replays read whatever indices/ranks/scales the captured tensors then hold), launch.
#include <cstdlib>
#include <string>

#include "../multi_glue.h"
#include "guard.h"
#include "ops_cuda.h"

namespace lora_ext::cuda {
namespace {

// Tensor-core tiles need sm_80+ (device and kernel image: the caller holds a DeviceGuard for
// ref); LORA_EXT_MULTI_TENSOR_CORES=0 forces the streaming path on
// any GPU (how the sm_70/sm_75 path is tested on newer GPUs).
bool use_tensor_cores(const at::Tensor& ref) {
  static const bool allowed = [] {
    const char* v = std::getenv("LORA_EXT_MULTI_TENSOR_CORES");
    return v == nullptr || std::string(v) != "0";
  }();
  const int dev = ref.device().index();
  return allowed && compute_capability(dev) >= 80 && tf32_mma_compiled(dev);
}

MultiLoraParams make_params(const MultiArgs& a, const std::optional<at::Tensor>& bad,
                            const at::Tensor& ref) {
  MultiLoraParams p{};
  p.y = a.y2.defined() ? a.y2.data_ptr() : nullptr;
  p.x = a.x2.defined() ? a.x2.data_ptr() : nullptr;
  p.A = a.A.defined() ? a.A.data_ptr() : nullptr;
  p.B = a.B.defined() ? a.B.data_ptr() : nullptr;
  p.idx = a.idx.data_ptr();
  p.idx64 = a.idx64;
  p.scales = a.scales.defined() ? a.scales.data_ptr<float>() : nullptr;
  p.ranks = a.ranks.data_ptr<int32_t>();
  p.bad = bad.has_value() ? bad->data_ptr<int>() : nullptr;
  p.T = a.T;
  p.in = a.in;
  p.out = a.out;
  p.S = a.S;
  p.r_max = a.r_max;
  p.n = a.n;
  p.ldx = a.x2.defined() && a.T > 1 ? a.x2.stride(0) : a.in;
  p.ldy = a.y2.defined() && a.T > 1 ? a.y2.stride(0) : a.out;
  p.slot_stride = a.slot_stride;
  for (int64_t i = 0; i <= kMultiMaxSlices; ++i)
    p.out_off[i] = i < static_cast<int64_t>(a.out_off.size()) ? a.out_off[i] : a.out;
  p.u_scale = a.u_scale;
  p.num_sms = sm_count(ref);
  p.tc = use_tensor_cores(ref);
  return p;
}

MultiLoraPlan make_plan(const char* op, const MultiLoraParams& p, bool allow_split) {
  const MultiLoraPlan plan = multi_lora_plan(p, allow_split);
  TORCH_CHECK(p.T < (int64_t{1} << 31) && plan.ws_ints < (int64_t{1} << 31), op, ": T = ", p.T,
              " tokens and ", p.S, " slots are more than the int32 token sort allows; split the batch");
  TORCH_CHECK(plan.blocks < (int64_t{1} << 31), op, ": T = ", p.T, " tokens with out = ", p.out,
              " columns and ", p.S, " slots need ", plan.blocks,
              " thread blocks, more than one CUDA launch allows (2^31 - 1); split the batch");
  return plan;
}

// With out == 0 no kernel runs, yet the indices must be counted as a launch would count them
// (every index that is neither -1 nor a slot), without a host sync.
void count_bad_without_launch(const MultiArgs& a, const std::optional<at::Tensor>& bad) {
  if (!bad.has_value() || a.T == 0) return;
  const at::Tensor& i = a.idx;
  bad->select(0, 0).add_(((i != -1) & ((i < 0) | (i >= a.S))).sum().to(at::kInt));
}

at::Tensor workspace(const MultiLoraPlan& plan, const at::Tensor& ref) {
  return at::empty({plan.ws_ints}, ref.options().dtype(at::kInt));
}

// Launches the phases in `stages`, starting with the shrink: allocates its fp32 split-K
// partials and the int workspace (shapes only). u_out: where kMultiReduce writes u, or null.
void launch_with_shrink(const char* op, const MultiArgs& a, MultiLoraParams& p,
                        const at::Tensor& x, float* u_out, int stages) {
  const MultiLoraPlan plan = make_plan(op, p, true);
  at::Tensor u = at::empty({plan.ksplit * a.n * a.T * a.r_max}, x.options().dtype(at::kFloat));
  at::Tensor ws = workspace(plan, x);
  p.u = u.data_ptr<float>();
  p.u_out = u_out;
  p.ws = ws.data_ptr<int32_t>();
  LORA_EXT_CUDA_CHECK(multi_lora(a.dtype, p, plan, stages, current_stream(x)));
}

}  // namespace

void multi_lora_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A_pool,
                     const at::Tensor& B_pool, const at::Tensor& indices, const at::Tensor& scales,
                     const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                     const std::optional<at::Tensor>& bad_index_count) {
  const char* op = "multi_lora_";
  MultiArgs a = check_multi_lora(op, y, x, A_pool, B_pool, indices, scales, ranks, out_slices,
                                 bad_index_count);
  TORCH_CHECK(on_device(x), op, ": CUDA kernel called with x on ", x.device());
  const DeviceGuard guard(x.device());
  if (a.T == 0 || a.out == 0) return count_bad_without_launch(a, bad_index_count);
  MultiLoraParams p = make_params(a, bad_index_count, x);
  launch_with_shrink(op, a, p, x, nullptr, kMultiShrink | kMultiExpand);
  if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
}

static at::Tensor shrink_impl(const at::Tensor& x, const at::Tensor& A_pool,
                            const at::Tensor& indices, const at::Tensor& ranks,
                            const std::optional<at::Tensor>& bad_index_count, double scale) {
  const char* op = "lora_shrink";
  MultiArgs a = check_shrink(op, x, A_pool, indices, ranks, scale, bad_index_count);
  TORCH_CHECK(on_device(x), op, ": CUDA kernel called with x on ", x.device());
  at::Tensor out = at::empty({a.n, a.T, a.r_max}, x.options().dtype(at::kFloat));
  if (a.T > 0) {
    const DeviceGuard guard(x.device());
    MultiLoraParams p = make_params(a, bad_index_count, x);
    launch_with_shrink(op, a, p, x, out.data_ptr<float>(), kMultiShrink | kMultiReduce);
  }
  return A_pool.dim() == 4 ? out : out.view({a.T, a.r_max});
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A_pool,
                           const at::Tensor& indices, const at::Tensor& ranks, double scale) {
  return shrink_impl(x, A_pool, indices, ranks, std::nullopt, scale);
}

at::Tensor lora_shrink_counted_cuda(const at::Tensor& x, const at::Tensor& A_pool,
                                 const at::Tensor& indices, const at::Tensor& ranks,
                                 at::Tensor bad_index_count, double scale) {
  return shrink_impl(x, A_pool, indices, ranks, bad_index_count, scale);
}

void lora_expand_cuda(at::Tensor y, const at::Tensor& u, const at::Tensor& B_pool,
                      const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& ranks,
                      at::OptionalIntArrayRef out_slices,
                      const std::optional<at::Tensor>& bad_index_count, bool add_inputs) {
  const char* op = "lora_expand_";
  MultiArgs a = check_expand(op, y, u, B_pool, indices, scales, ranks, out_slices,
                             bad_index_count);
  TORCH_CHECK(on_device(y), op, ": CUDA kernel called with y on ", y.device());
  const DeviceGuard guard(y.device());
  if (!add_inputs) a.y2.zero_();
  if (a.T == 0 || a.out == 0) {
    if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
    return count_bad_without_launch(a, bad_index_count);
  }
  MultiLoraParams p = make_params(a, bad_index_count, y);
  const MultiLoraPlan plan = make_plan(op, p, false);
  at::Tensor ws = workspace(plan, y);
  p.u = a.u.data_ptr<float>();
  p.ws = ws.data_ptr<int32_t>();
  LORA_EXT_CUDA_CHECK(multi_lora(a.dtype, p, plan, kMultiExpand, current_stream(y)));
  if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
}

}  // namespace lora_ext::cuda
