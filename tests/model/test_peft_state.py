"""peft model -> ArrayRecord -> peft model gives identical tensors and outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import AdapterError, state_from_dict
from fedlora.model.models import build_lora_model, load_base_model
from fedlora.model.peft_state import load_into_peft, state_from_peft
from fedlora.run.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedlora.wire.records import from_arrayrecord, to_arrayrecord

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("query", "value"))


def _perturbed(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(100, 2000, (3, 12), generator=gen),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
    }


def test_keys_are_peft_names(tiny_model):
    model = build_lora_model(str(tiny_model), 20, SPEC, seed=0)
    state = state_from_peft(model, SPEC.scaling)
    keys = state.to_state_dict().keys()
    assert any(k.endswith("attention.self.query.lora_A.weight") for k in keys)
    assert "base_model.model.classifier.weight" in keys
    assert state.rank == 4 and len(state.factors) == 4  # 2 layers x (query, value)


def test_round_trip_identical_tensors_and_outputs(tiny_model):
    src = _perturbed(build_lora_model(str(tiny_model), 20, SPEC, seed=0), seed=1)
    record = to_arrayrecord(state_from_peft(src, SPEC.scaling).to_state_dict())
    dst = build_lora_model(str(tiny_model), 20, SPEC, seed=99)
    load_into_peft(dst, state_from_dict(from_arrayrecord(record), SPEC.scaling))
    a, b = state_from_peft(src, 1.0).to_state_dict(), state_from_peft(dst, 1.0).to_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(src(**_inputs()).logits, dst(**_inputs()).logits, rtol=0, atol=0)


def test_load_rejects_wrong_shapes(tiny_model):
    model = build_lora_model(str(tiny_model), 20, SPEC, seed=0)
    other = build_lora_model(str(tiny_model), 20, SPEC.with_rank(2), seed=0)
    with pytest.raises(AdapterError, match="shape"):
        load_into_peft(model, state_from_peft(other, 1.0))


def test_checkpoint_loads_with_peft_from_pretrained(tiny_model, tmp_path):
    model = _perturbed(build_lora_model(str(tiny_model), 20, SPEC, seed=0), seed=3)
    state = state_from_peft(model, SPEC.scaling)
    save_checkpoint(tmp_path / "ckpt", model, state, {"round": 1})
    loaded = PeftModel.from_pretrained(load_base_model(str(tiny_model), 20), tmp_path / "ckpt")
    loaded.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs()).logits, model(**_inputs()).logits)
    back, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["round"] == 1
    for k, v in state.to_state_dict().items():
        np.testing.assert_array_equal(back.to_state_dict()[k], v)


def test_corrupt_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    model = build_lora_model(str(tiny_model), 20, SPEC, seed=0)
    folder = save_checkpoint(tmp_path / "c", model, state_from_peft(model, 1.0), {"round": 2})
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(folder)
    (folder / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "nowhere")
