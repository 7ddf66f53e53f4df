"""lora_ext: fused LoRA kernels for PyTorch (CPU and CUDA)."""
__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (loads the kernels and registers torch.ops.lora_ext)
from . import ops  # noqa: F401
from .multi import LoRAContext, MultiLoRALinear, attach_context  # noqa: F401,E402
