// CPU kernels, registered for the CPU dispatch key in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace lora_ext::cpu {

void lora_apply_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    double scale);

}  // namespace lora_ext::cpu
