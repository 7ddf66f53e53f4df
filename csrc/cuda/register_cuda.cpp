// Registers every CUDA launcher for the CUDA dispatch key (emulated build: for the CPU key of
// the lora_ext_emu library, see csrc/cuda/emu).
#include <torch/library.h>

#include "ops_cuda.h"

namespace lora_ext::cuda {

#if defined(LORA_EXT_EMU)
TORCH_LIBRARY_IMPL(lora_ext_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
#endif
  m.impl("lora_apply_", &lora_apply_cuda);
  m.impl("multi_lora_", &multi_lora_cuda);
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_shrink.counted", &lora_shrink_counted_cuda);
  m.impl("lora_expand_", &lora_expand_cuda);
  m.impl("lora_linear_fwd", &lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cuda);
  m.impl("merge_", &merge_cuda);
  m.impl("remerge_", &remerge_cuda);
  m.impl("merge_points_", &merge_points_cuda);
  m.impl("merge_code_failures", &merge_code_failures_cuda);
  m.impl("dora_norm", &dora_norm_cuda);
}

}  // namespace lora_ext::cuda
