// CUDA launchers (torch side), registered for the CUDA dispatch key in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace lora_ext::cuda {

void lora_apply_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale);

void multi_lora_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A_pool,
                     const at::Tensor& B_pool, const at::Tensor& indices, const at::Tensor& scales,
                     const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                     const std::optional<at::Tensor>& bad_index_count);
at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A_pool,
                           const at::Tensor& indices, const at::Tensor& ranks);
at::Tensor lora_shrink_counted_cuda(const at::Tensor& x, const at::Tensor& A_pool,
                                 const at::Tensor& indices, const at::Tensor& ranks,
                                 at::Tensor bad_index_count);
void lora_expand_cuda(at::Tensor y, const at::Tensor& u, const at::Tensor& B_pool,
                      const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& ranks,
                      at::OptionalIntArrayRef out_slices,
                      const std::optional<at::Tensor>& bad_index_count);

}  // namespace lora_ext::cuda
