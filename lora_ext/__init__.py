"""lora_ext: fused LoRA kernels for PyTorch (CPU and CUDA)."""
__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401  (loads the kernels and registers torch.ops.lora_ext)
except ImportError as _e:  # the source tree shadowing an installed build is the usual cause
    import glob as _glob
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    if _glob.glob(_os.path.join(_here, "_C.*")):
        raise
    raise ImportError(
        f"lora_ext: no compiled extension (_C*.so) in {_here}. This is an unbuilt source tree: "
        "if lora_ext is installed (pip install .), run Python/pytest from another directory; "
        "to work in the checkout, build it in place: pip install --no-build-isolation -e .") from _e
from . import ops  # noqa: F401
from .adapters import Adapter, LayerWeights, load_adapter
from .inject import inject, lora_layers, lora_state_dict, mark_only_lora_trainable
from .embedding import LoRAEmbedding
from .layers import LoRALayer, LoRALinear
from .merged_linear import MergedLinear
from .conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAConvNd
from .param_lora import LoRAParameter
from .merge import merge, merge_and_unload, unmerge  # (the functions shadow the submodules)
from .combine import combine
from .multi import LoRAContext, MultiLoRAEmbedding, MultiLoRALinear, attach_context
from .pool import AdapterPool
from .peft_patch import patch_peft, unpatch_peft

__all__ = ["ops", "Adapter", "LayerWeights", "load_adapter", "LoRALayer", "LoRALinear", "LoRAEmbedding", "MergedLinear",
           "LoRAConvNd", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAParameter", "inject",
           "lora_layers", "lora_state_dict", "mark_only_lora_trainable", "merge", "unmerge",
           "merge_and_unload", "combine", "LoRAContext", "MultiLoRALinear", "MultiLoRAEmbedding",
           "attach_context",
           "AdapterPool", "patch_peft", "unpatch_peft"]
