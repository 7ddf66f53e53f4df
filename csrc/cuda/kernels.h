// CUDA launchers (torch side), registered for the CUDA dispatch key in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace lora_ext::cuda {

void lora_apply_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale);

}  // namespace lora_ext::cuda
