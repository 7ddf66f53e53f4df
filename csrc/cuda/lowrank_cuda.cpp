// CUDA instances of the single-adapter ops (glue in csrc/lowrank_glue.h): device guard, current
// stream, launch-error checks. Workspaces depend only on shapes, so CUDA-graph capture works.
#include <cstdlib>

#include "../lowrank_glue.h"
#include "guard.h"
#include "ops_cuda.h"

namespace lora_ext::cuda {
namespace {

struct CudaBackend {
  static constexpr bool kFusedWeightGrads = false;  // dA, dB by cuBLAS
  // The order of lora_linear's two halves: cuBLAS first (bias in its epilogue), LoRA term added
  // by the expand (default); or, with LORA_EXT_CUDA_EXPAND_FIRST=1 (read at every call, so a
  // benchmark can time both orders in one run), the expand writes bias + LoRA term and cuBLAS
  // accumulates into it (beta = 1). Which is faster depends on whether cuBLAS hides the read of C.
  static bool expand_first() {
    const char* v = std::getenv("LORA_EXT_CUDA_EXPAND_FIRST");
    return v != nullptr && v[0] == '1';
  }
  // LORA_EXT_CUDA_BLAS=1 (read at every call, like the order above): bf16 jobs of more than 8
  // tokens without dropout run both halves on cuBLAS's tensor cores (blas_halves) instead of
  // lora_ext's kernels.
  static bool blas() {
    const char* v = std::getenv("LORA_EXT_CUDA_BLAS");
    return v != nullptr && v[0] == '1';
  }
  // 16-bit jobs of more than 8 tokens run on TF32 tensor-core tiles (sm_80+ device and kernel
  // image); LORA_EXT_CUDA_TENSOR_CORES=0 (read at every call, like the above) keeps them on
  // the CUDA-core tiles (gemm_nt), as on older GPUs.
  static bool tensor_cores(const at::Tensor& like) {
    const char* v = std::getenv("LORA_EXT_CUDA_TENSOR_CORES");
    if (v != nullptr && v[0] == '0') return false;
    const int dev = like.device().index();
    return compute_capability(dev) >= 80 && tf32_mma_compiled(dev);
  }
  static void run(DType dt, LowRankJob& j, const at::Tensor& like) {
    TORCH_CHECK(on_device(like), "lora_ext: CUDA kernel called with a tensor on ", like.device());
    TORCH_CHECK(j.dA == nullptr && j.dBt == nullptr,
                "lora_ext: the CUDA low-rank kernel has no weight-gradient mode (CPU only)");
    TORCH_CHECK(!j.overwrite_y || j.ldy == j.out, "lora_ext: overwrite_y needs a contiguous y");
    const DeviceGuard guard(like.device());
    if (dt == DType::BF16 && j.T > 8 && j.dropout_p == 0.f && j.r > 0 && blas())
      return blas_halves(j, like);
    j.num_sms = sm_count(like);
    j.tensor_cores = tensor_cores(like);
    const int64_t ws = lowrank_workspace(dt, j);  // split-K partials: only when K is split
    const at::Tensor work = ws > 0 ? at::empty({ws}, like.options().dtype(at::kFloat)) : at::Tensor();
    j.work = ws > 0 ? work.data_ptr<float>() : nullptr;
    LORA_EXT_CUDA_CHECK(lowrank(dt, j, current_stream(like)));
  }
  // The job on cuBLAS (bf16):
  //   shrink: u = x A^T, bf16 products summed in fp32 into the fp32 u (mm with out_dtype);
  //   expand: y (+)= s [u_hi | u_lo] [B | B]^T, one bf16 GEMM over 2r: u_hi = bf16(u) and
  //     u_lo = bf16(u - u_hi) carry 16 of u's 24 bits, the sum is fp32 and y is rounded once,
  //     in the epilogue (beta = 1; 0 with overwrite_y and no bias).
  static void blas_halves(LowRankJob& j, const at::Tensor& like) {
    const auto bf = like.options().dtype(at::kBFloat16), f32 = like.options().dtype(at::kFloat);
    at::Tensor u = at::from_blob(j.u, {j.T, j.r}, f32);
    if (j.x != nullptr) {
      const at::Tensor x = at::from_blob(const_cast<void*>(j.x), {j.T, j.in}, {j.ldx, 1}, bf);
      const at::Tensor A = at::from_blob(const_cast<void*>(j.A), {j.r, j.in}, bf);
      if (j.in == 0) {
        u.zero_();
      } else if (like.is_cuda()) {
        at::mm_out(u, x, A.t(), at::kFloat);
      } else {  // the emulated build (CPU tensors): aten's mm has no out_dtype on the CPU
        at::mm_out(u, x.to(at::kFloat), A.t().to(at::kFloat));
      }
    }
    if (j.y == nullptr || j.out == 0) return;
    at::Tensor y = at::from_blob(j.y, {j.T, j.out}, {j.ldy, 1}, bf);
    const at::Tensor B = at::from_blob(const_cast<void*>(j.B), {j.out, j.r}, bf);
    const at::Tensor hi = u.to(at::kBFloat16);
    // u - hi is exact in fp32; inf - inf (u = +-inf) becomes 0 so that y gets the inf of hi
    const at::Tensor lo = at::nan_to_num(u - hi.to(at::kFloat), 0.0, 0.0, 0.0).to(at::kBFloat16);
    const at::Tensor u2 = at::cat({hi, lo}, 1), B2 = at::cat({B, B}, 1);
    double beta = 1.0;
    if (j.overwrite_y && j.bias != nullptr) {
      y.copy_(at::from_blob(const_cast<void*>(j.bias), {1, j.out}, bf).expand({j.T, j.out}));
    } else if (j.overwrite_y) {
      beta = 0.0;  // y's old contents (uninitialised) are not read
    }
    y.addmm_(u2, B2.t(), beta, static_cast<double>(j.scale));
  }
  static void dropout_rows(DType dt, const at::Tensor& src, at::Tensor& dst, double p,
                           const at::Tensor& seed) {
    const DeviceGuard guard(src.device());
    LORA_EXT_CUDA_CHECK(cuda::dropout_rows(dt, src.data_ptr(), src.stride(0), dst.data_ptr(), src.size(0),
                                      src.size(1), static_cast<float>(p), seed.data_ptr<int64_t>(),
                                      sm_count(src), current_stream(src)));
  }
};

}  // namespace

void lora_apply_cuda(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                     double scale) {
  lora_apply_impl<CudaBackend>(y, x, A, B, scale);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out) {
  const DeviceGuard guard(x.device());
  return lora_linear_fwd_impl<CudaBackend>(x, weight, bias, A, B, scale, dropout_p, seed, fan_in_fan_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& u, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, bool fan_in_fan_out, std::array<bool, 4> output_mask) {
  const DeviceGuard guard(x.device());
  return lora_linear_bwd_impl<CudaBackend>(grad, x, weight, A, B, u, scale, dropout_p, seed,
                                           fan_in_fan_out, output_mask);
}

}  // namespace lora_ext::cuda
