// CUDA ops (torch side), registered for the CUDA dispatch key in register_cuda.cpp.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace lora_ext::cuda {

void lora_apply_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale);
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& u, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out, std::array<bool, 4> output_mask);
void merge_cuda(at::Tensor weight, at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                bool fan_in_fan_out);
void remerge_cuda(at::Tensor weight, at::Tensor codes, at::Tensor fails, int64_t bits,
                  at::TensorList A_old, at::TensorList B_old, at::ArrayRef<double> s_old,
                  at::TensorList A_new, at::TensorList B_new, at::ArrayRef<double> s_new,
                  bool fan_in_fan_out);
void merge_points_cuda(at::Tensor weight, const at::Tensor& idx, const at::Tensor& vals,
                       at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                       bool fan_in_fan_out);
at::Tensor merge_code_failures_cuda(const at::Tensor& w0, const at::Tensor& s);
at::Tensor dora_norm_cuda(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                          double scale, bool fan_in_fan_out);

void multi_lora_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A_pool,
                     const at::Tensor& B_pool, const at::Tensor& indices, const at::Tensor& scales,
                     const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                     const std::optional<at::Tensor>& bad_index_count);
at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A_pool,
                          const at::Tensor& indices, const at::Tensor& ranks, double scale);
at::Tensor lora_shrink_counted_cuda(const at::Tensor& x, const at::Tensor& A_pool,
                                 const at::Tensor& indices, const at::Tensor& ranks,
                                 at::Tensor bad_index_count, double scale);
void lora_expand_cuda(at::Tensor y, const at::Tensor& u, const at::Tensor& B_pool,
                      const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& ranks,
                      at::OptionalIntArrayRef out_slices,
                      const std::optional<at::Tensor>& bad_index_count, bool add_inputs);

}  // namespace lora_ext::cuda
