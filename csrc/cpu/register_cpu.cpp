// Registers every CPU kernel for the CPU dispatch key.
#include <torch/library.h>

#include "ops_cpu.h"

namespace lora_ext::cpu {

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_apply_", &lora_apply_cpu);
  m.impl("multi_lora_", &multi_lora_cpu);
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_shrink.counted", &lora_shrink_counted_cpu);
  m.impl("lora_expand_", &lora_expand_cpu);
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
  m.impl("merge_", &merge_cpu);
  m.impl("remerge_", &remerge_cpu);
  m.impl("merge_points_", &merge_points_cpu);
  m.impl("merge_code_failures", &merge_code_failures_cpu);
  m.impl("dora_norm", &dora_norm_cpu);
}

}  // namespace lora_ext::cpu
