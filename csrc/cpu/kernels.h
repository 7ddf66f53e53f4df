// CPU kernels, registered for the CPU dispatch key in register.cpp.
#pragma once
#include <ATen/ATen.h>

namespace lora_ext::cpu {

void lora_apply_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    double scale);

void multi_lora_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A_pool,
                    const at::Tensor& B_pool, const at::Tensor& indices, const at::Tensor& scales,
                    const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                    const std::optional<at::Tensor>& bad_index_count);
at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A_pool,
                           const at::Tensor& indices, const at::Tensor& ranks);
at::Tensor lora_shrink_counted_cpu(const at::Tensor& x, const at::Tensor& A_pool,
                                 const at::Tensor& indices, const at::Tensor& ranks,
                                 at::Tensor bad_index_count);
void lora_expand_cpu(at::Tensor y, const at::Tensor& u, const at::Tensor& B_pool,
                     const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& ranks,
                     at::OptionalIntArrayRef out_slices,
                     const std::optional<at::Tensor>& bad_index_count);

}  // namespace lora_ext::cpu
