// CUDA launcher of lora_apply_: validates, allocates the fp32 workspace u[T, r]
// (its size depends only on shapes, so CUDA-graph capture works) and launches.
#include "../checks.h"
#include "guard.h"
#include "kernels.h"

namespace lora_ext::cuda {

void lora_apply_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale) {
  LoraApplyArgs a = check_lora_apply("lora_apply_", y, x, A, B);
  TORCH_CHECK(x.is_cuda(), "lora_apply_: CUDA kernel called with x on ", x.device());
  if (a.T == 0 || a.out == 0 || a.in == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor u = at::empty({a.T, a.r}, x.options().dtype(at::kFloat));
  LoraApplyParams p;
  p.y = a.y2.data_ptr();
  p.x = a.x2.data_ptr();
  p.A = a.A.data_ptr();
  p.B = a.B.data_ptr();
  p.u = u.data_ptr<float>();
  p.T = a.T;
  p.in = a.in;
  p.out = a.out;
  p.r = a.r;
  p.ldx = a.T > 1 ? a.x2.stride(0) : a.in;
  p.ldy = a.T > 1 ? a.y2.stride(0) : a.out;
  p.scale = static_cast<float>(scale);
  p.num_sms = sm_count(x);
  C10_CUDA_CHECK(lora_apply(a.dtype, p, current_stream(x)));
  if (a.copy_back) y.copy_(a.y2.view(y.sizes()));
}

}  // namespace lora_ext::cuda
