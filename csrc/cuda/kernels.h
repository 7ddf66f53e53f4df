// CUDA launchers (torch side), registered for the CUDA dispatch key in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace lora_ext::cuda {

void lora_apply_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale);
void merge_cuda(at::Tensor weight, at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                bool fan_in_fan_out);
void remerge_cuda(at::Tensor weight, at::Tensor codes, at::Tensor fails, int64_t bits,
                  at::TensorList A_old, at::TensorList B_old, at::ArrayRef<double> s_old,
                  at::TensorList A_new, at::TensorList B_new, at::ArrayRef<double> s_new,
                  bool fan_in_fan_out);
void merge_points_cuda(at::Tensor weight, const at::Tensor& idx, const at::Tensor& vals,
                       at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                       bool fan_in_fan_out);

}  // namespace lora_ext::cuda
