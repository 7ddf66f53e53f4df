// CPU instances of the single-adapter ops (glue in csrc/lowrank_glue.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../lowrank_glue.h"
#include "ops_cpu.h"

namespace lora_ext::cpu {
namespace {

struct CpuBackend {
  static constexpr bool kFusedWeightGrads = true;  // dA, dB in the backward's pass (lowrank_job.h)
  static constexpr bool expand_first() { return true; }  // LoRA term first, base GEMM with beta = 1
  static void run(DType dt, LowRankJob& j, const at::Tensor& like) {
    TORCH_CHECK(like.device().is_cpu(), "lora_ext: CPU kernel called with a tensor on ", like.device());
    lowrank_cpu(dt, j);
  }
  static void dropout_rows(DType dt, const at::Tensor& src, at::Tensor& dst, double p,
                           const at::Tensor& seed) {
    dropout_rows_cpu(dt, src.data_ptr(), src.stride(0), dst.data_ptr(), src.size(0), src.size(1),
                     static_cast<float>(p), seed.item<int64_t>());
  }
};

}  // namespace

void dropout_rows_cpu(DType dt, const void* src, int64_t ld, void* dst, int64_t T, int64_t width,
                      float p, int64_t seed) {
  const Dropout d = Dropout::make(p, static_cast<uint64_t>(seed));
  dispatch_dtype<float, c10::Half, c10::BFloat16>(dt, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const T_* s = static_cast<const T_*>(src) + t * ld;
        T_* o = static_cast<T_*>(dst) + t * width;
        for (int64_t k = 0; k < width; ++k)
          o[k] = static_cast<T_>(static_cast<float>(s[k]) * d.factor(static_cast<uint64_t>(t) * width + k));
      }
    });
  });
}

void lora_apply_cpu(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    double scale) {
  lora_apply_impl<CpuBackend>(y, x, A, B, scale);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out) {
  return lora_linear_fwd_impl<CpuBackend>(x, weight, bias, A, B, scale, dropout_p, seed, fan_in_fan_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& u, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out, std::array<bool, 4> output_mask) {
  return lora_linear_bwd_impl<CpuBackend>(grad, x, weight, A, B, u, scale, dropout_p, seed,
                                          fan_in_fan_out, output_mask);
}

}  // namespace lora_ext::cpu
