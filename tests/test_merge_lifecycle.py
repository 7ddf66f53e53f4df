"""Model-level merge lifecycle: dtype conversions of merged models, errors naming the layer,
what merge_and_unload leaves behind."""
import copy

import pytest
import torch
from models import tiny_llama
from test_merge_model import base_weights, build, ids, same_bits

import lora_ext


@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16])
def test_merged_model_changes_dtype_and_unmerges_exactly(to):
    """.half() / .to(bf16) of a merged fp32 model (an unmerge then raised 'cannot unmerge exactly',
    and so did model.train()): the merge is redone in the new dtype."""
    _, model = build("llama", torch.float32, "cpu")
    ref = copy.deepcopy(model).to(to)  # converted, then merged
    lora_ext.merge(model)
    model.to(to)
    lora_ext.merge(ref)
    merged, ref_merged = base_weights(model), base_weights(ref)
    assert all(same_bits(merged[n], ref_merged[n]) for n in ref_merged)  # conversion and merge commute
    lora_ext.unmerge(ref)
    lora_ext.unmerge(model)
    unmerged, ref_unmerged = base_weights(model), base_weights(ref)
    assert all(same_bits(unmerged[n], ref_unmerged[n]) for n in ref_unmerged)  # = W0 converted
    lora_ext.merge(model)
    model.train()  # unmerges
    assert not any(m.merged for m in lora_ext.lora_layers(model).values())
    x = ids("cpu")
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, ref.eval()(x).logits)


def test_merged_model_round_trips_through_a_wider_dtype():
    """fp32 -> double -> fp32 keeps the merged bits (no re-merge in double, which merge_ does not
    take), so the unmerge is still exact."""
    _, model = build("llama", torch.float32, "cpu")
    before = base_weights(model)
    lora_ext.merge(model)
    model.double().float()
    lora_ext.unmerge(model)
    after = base_weights(model)
    assert all(same_bits(after[n], before[n]) for n in before)
