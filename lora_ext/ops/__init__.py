"""lora_ext's custom ops (``torch.ops.lora_ext.*``), one module per csrc family: wrappers, fake
kernels and autograd. Every op has a CPU kernel, a CUDA kernel and a fake kernel, so it traces
under ``torch.compile(fullgraph=True)`` and can be captured in CUDA graphs."""
from .lowrank import build_info, lora_apply_, lora_linear
from .merge import check_merge_finite, dora_norm, merge_, unmerge_
from .merge_state import MergeState
from .multi import lora_expand_, lora_shrink, multi_lora_

__all__ = ["lora_apply_", "lora_linear", "build_info", "merge_", "unmerge_", "check_merge_finite",
           "dora_norm", "MergeState", "multi_lora_", "lora_shrink", "lora_expand_"]
