// Registers every CPU kernel for the CPU dispatch key.
#include <torch/library.h>

#include "kernels.h"

namespace lora_ext::cpu {

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("lora_apply_", &lora_apply_cpu); }

}  // namespace lora_ext::cpu
