// CPU kernels (raw pointers) and the CPU ops built on them, registered in register_cpu.cpp.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "../dtype.h"
#include "../lowrank_job.h"

namespace lora_ext::cpu {

// The single-adapter low-rank job of csrc/lowrank_job.h.
void lowrank_cpu(DType dt, const LowRankJob& job);
// dst[t, :] = keep(t * width + k) * src[t, :] (rows of length width, src row stride ld).
void dropout_rows_cpu(DType dt, const void* src, int64_t ld, void* dst, int64_t T, int64_t width,
                      float p, int64_t seed);

void lora_apply_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    double scale);
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& u, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out, std::array<bool, 4> output_mask);
void merge_cpu(at::Tensor weight, at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
               bool fan_in_fan_out);
void remerge_cpu(at::Tensor weight, at::Tensor codes, at::Tensor fails, int64_t bits,
                 at::TensorList A_old, at::TensorList B_old, at::ArrayRef<double> s_old,
                 at::TensorList A_new, at::TensorList B_new, at::ArrayRef<double> s_new,
                 bool fan_in_fan_out);
void merge_points_cpu(at::Tensor weight, const at::Tensor& idx, const at::Tensor& vals,
                      at::TensorList A, at::TensorList B, at::ArrayRef<double> scales,
                      bool fan_in_fan_out);
at::Tensor merge_code_failures_cpu(const at::Tensor& w0, const at::Tensor& s);
// dora_cpu.cpp
at::Tensor dora_norm_cpu(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         double scale, bool fan_in_fan_out);

void multi_lora_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A_pool,
                    const at::Tensor& B_pool, const at::Tensor& indices, const at::Tensor& scales,
                    const at::Tensor& ranks, at::OptionalIntArrayRef out_slices,
                    const std::optional<at::Tensor>& bad_index_count);
at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A_pool,
                          const at::Tensor& indices, const at::Tensor& ranks, double scale);
at::Tensor lora_shrink_counted_cpu(const at::Tensor& x, const at::Tensor& A_pool,
                                 const at::Tensor& indices, const at::Tensor& ranks,
                                 at::Tensor bad_index_count, double scale);
void lora_expand_cpu(at::Tensor y, const at::Tensor& u, const at::Tensor& B_pool,
                     const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& ranks,
                     at::OptionalIntArrayRef out_slices,
                     const std::optional<at::Tensor>& bad_index_count, bool add_inputs);

}  // namespace lora_ext::cpu
