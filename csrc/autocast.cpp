// Autocast rules (the AutocastCPU / AutocastCUDA dispatch keys): inside torch.autocast the ops
// take mixed-precision inputs the way torch's own layers do, instead of failing on a dtype mix.
//   functional ops (lora_linear_fwd, lora_shrink): every floating input is cast to the autocast
//     dtype, as F.linear's are (fp32 weights and x -> bf16/fp16; u stays fp32; y in that dtype);
//   in-place ops (lora_apply_, multi_lora_, lora_expand_): y keeps its dtype (typically the
//     base layer's autocast output) and the floating inputs are cast to it, but for the fp32
//     `scales` and lora_expand_'s `u` (fp32 or y's dtype, both accepted).
// Casts go through at::autocast::cached_cast: fp64 and other devices' tensors are left alone, and
// a trainable fp32 leaf (A, B) is cast once per autocast region. The casts are recorded by
// autograd, so gradients reach fp32 parameters in fp32. Ops without a rule (the merge family,
// lora_linear_bwd) pass through autocast unchanged.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace lora_ext {
namespace {

bool kept_as_is(const c10::OperatorHandle& op, const std::string& arg) {
  return arg == "scales" || (arg == "u" && op.schema().name() == "lora_ext::lora_expand_");
}

// Boxed: the rule above reads the schema, so one kernel serves every op it applies to.
template <c10::DeviceType device>
void autocast_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto first = stack->size() - args.size();
  const auto* alias = args[0].alias_info();
  const bool in_place = alias != nullptr && alias->isWrite();
  const at::ScalarType to = in_place ? (*stack)[first].toTensor().scalar_type()
                                     : at::autocast::get_autocast_dtype(device);
  for (size_t i = 0; i < args.size(); ++i) {
    c10::IValue& v = (*stack)[first + i];
    const auto* a = args[i].alias_info();
    if ((a != nullptr && a->isWrite()) || kept_as_is(op, args[i].name())) continue;
    if (v.isTensor()) {
      v = at::autocast::cached_cast(to, v.toTensor(), device);
    } else if (v.isTensorList()) {
      v = at::autocast::cached_cast(to, v.toTensorVector(), device);
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

template <c10::DeviceType device>
void register_rules(torch::Library& m) {
  for (const char* name : {"lora_linear_fwd", "lora_shrink", "lora_shrink.counted", "lora_apply_",
                           "multi_lora_", "lora_expand_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_boxed<device>>());
  }
}

TORCH_LIBRARY_IMPL(lora_ext, AutocastCPU, m) { register_rules<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(lora_ext, AutocastCUDA, m) { register_rules<c10::DeviceType::CUDA>(m); }

}  // namespace
}  // namespace lora_ext
