"""The state dict of a merged LoRA layer says so (LoRALayer and LoRAParameter derive from MergedStateDict).

A merged layer's base weight holds W0 + s B A and its factors are saved beside it, so its
``state_dict()`` loaded into an unmerged layer (a fresh ``inject``ed model) would add the adapter a
second time, without a word. ``state_dict()`` therefore records ``lora_merged`` in the layer's entry
of the state dict's metadata (``state_dict._metadata``, kept by ``torch.save`` / ``torch.load``, also
with ``weights_only=True``), and loading such a state dict's weight into an unmerged layer is an
error naming the layer (``load_state_dict`` raises RuntimeError). Loading it into a merged layer
was already one (the layers cannot tell which weight a state dict holds without the metadata).
"""
from __future__ import annotations

__all__ = ["MergedStateDict"]


class MergedStateDict:
    """Mixin before nn.Module: marks a merged layer's state dict, refuses one in an unmerged layer."""

    def _merged_weight_key(self, prefix: str) -> str:
        """The state dict key of the weight a merge writes (LoRAParameter: its wrapped parameter's)."""
        return prefix + "weight"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = getattr(destination, "_metadata", None)
        if self.merged and meta is not None and prefix[:-1] in meta:  # (nn.Module.state_dict made the entry)
            meta[prefix[:-1]]["lora_merged"] = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = self._merged_weight_key(prefix)
        if not self.merged and local_metadata.get("lora_merged") and key in state_dict:
            error_msgs.append(
                f"{type(self).__name__}{f' {prefix[:-1]!r}' if prefix else ''}: the state dict is a merged layer's (its {key!r} holds "
                "the adapter, which it also has as factors), but this layer is not merged: loading it would add "
                "the adapter twice; unmerge before saving (lora_ext.unmerge), or save the adapter alone "
                "(lora_state_dict)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
