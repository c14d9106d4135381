"""forward_from_layer equals the full forward, bitwise on CPU in float32, for every architecture/layer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lat_lightning.config import LoraConfig, ModelConfig
from lat_lightning.models.forward_from_layer import forward_from_layer, skip_layers_below
from lat_lightning.models.hooks import add_to_residual, capture_residual
from lat_lightning.models.layers import get_decoder_layers
from lat_lightning.models.loading import apply_lora, load_model
from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES

# The long row is longer than gemma2's sliding window (8), so local and global layers both matter.
TEXTS = ["How do I bake bread at home? Mix flour, water and salt", "The sea"]


def _load(path) -> nn.Module:
    return load_model(ModelConfig(name_or_path=str(path)), train=False)


def _batch(tokenizer, side):
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        return dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = old


def _unpatched(model):
    return all("forward" not in vars(block) for block in get_decoder_layers(model))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_equals_full_forward_for_every_layer(arch, side, tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs[arch])
    batch = _batch(tiny_tokenizer, side)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # really padded
    assert model.dtype == torch.float32
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
    n = len(get_decoder_layers(model))
    cached = capture_residual(model, range(n), **batch, use_cache=False)
    with torch.no_grad():
        for layer in range(n):
            out = forward_from_layer(model, cached[layer], layer, batch["input_ids"], batch["attention_mask"])
            assert torch.equal(out, full), f"{arch} layer {layer} ({side} padding)"
        # -1 skips nothing: a plain full forward
        assert torch.equal(forward_from_layer(model, cached[0], -1, **batch), full)
    assert _unpatched(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_perturbed_cache_equals_hooked_full_forward(arch, tiny_model_dirs, tiny_tokenizer):
    """What attacks do: perturb h[l] once cached, rerun only the blocks above, same logits as the hook."""
    model = _load(tiny_model_dirs[arch])
    batch = _batch(tiny_tokenizer, "right")
    layer = 1
    cached = capture_residual(model, [layer], **batch)[layer]
    delta = torch.randn(cached.shape, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad(), add_to_residual(model, {layer: delta}):
        hooked = model(**batch, use_cache=False).logits
    with torch.no_grad():
        fast = forward_from_layer(model, cached + delta, layer, **batch)
    assert torch.equal(fast, hooked)


def test_layers_below_are_not_run_and_gradients_reach_the_state(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer, "right")
    layers = get_decoder_layers(model)
    counts = [0] * len(layers)
    handles = [
        block.mlp.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(layers)
    ]
    cached = capture_residual(model, [2], **batch)[2]
    counts[:] = [0] * len(layers)
    hidden = cached.clone().requires_grad_(True)
    logits = forward_from_layer(model, hidden, 2, **batch)
    for h in handles:
        h.remove()
    assert counts == [0, 0, 0, 1]  # blocks 0..2 skipped, block 3 computed
    logits.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_through_a_lora_wrapper(tiny_model_dirs, tiny_tokenizer):
    cfg = ModelConfig(name_or_path=str(tiny_model_dirs["llama"]), lora=LoraConfig(enabled=True, r=2))
    model = apply_lora(load_model(cfg, train=False, with_lora=False), cfg)
    # make the adapters non-trivial (peft initialises B to zero)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = _batch(tiny_tokenizer, "left")
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
        cached = capture_residual(model, [1], **batch, use_cache=False)[1]
        assert torch.equal(forward_from_layer(model, cached, 1, **batch), full)


@pytest.mark.parametrize("bad", [4, -3, 99])  # -2 is the input embeddings (EMBED), a valid layer
def test_out_of_range_layer_raises(bad, tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer, "right")
    hidden = torch.zeros(2, batch["input_ids"].shape[1], 64)
    with pytest.raises(IndexError, match=r"0\.\.3"):
        forward_from_layer(model, hidden, bad, **batch)
    assert _unpatched(model)


def test_layers_restored_when_the_body_raises(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer, "right")
    with torch.no_grad():
        full = model(**batch).logits
    hidden = torch.zeros(2, batch["input_ids"].shape[1], 64)
    with pytest.raises(RuntimeError, match="inside"), skip_layers_below(model, hidden, 2):
        assert not _unpatched(model)
        raise RuntimeError("inside")
    assert _unpatched(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, full)


class _TupleBlock(nn.Module):
    """Falcon/BLOOM/MPT style: returns ``(hidden, attention weights or None)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, output_attentions=False):
        self.calls += 1
        y = x + self.lin(x)
        return y, (y.sum(-1) if output_attentions else None)


class _OutputsZeroLM(nn.Module):
    """A model loop that takes ``hidden = outputs[0]`` (a bare tensor there would give its first batch row)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3, hidden_size=4)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_TupleBlock() for _ in range(3)])

    def forward(self, input_ids=None, attention_mask=None, use_cache=False, output_attentions=False):
        x = input_ids
        attentions = []
        for block in self.model.layers:
            outputs = block(x, output_attentions=output_attentions)
            x = outputs[0]
            attentions.append(outputs[1])
        return SimpleNamespace(logits=x, attentions=attentions)


@pytest.mark.parametrize("output_attentions", [False, True])
def test_tuple_blocks_and_a_loop_taking_outputs_zero(output_attentions):
    torch.manual_seed(0)
    model = _OutputsZeroLM()
    x = torch.randn(2, 5, 4)  # batch 2: a bare tensor indexed [0] would drop a row
    with torch.no_grad():
        full = model(x, output_attentions=output_attentions)
        cached = capture_residual(model, [1], input_ids=x)[1]
        calls = [b.calls for b in model.model.layers]
        with skip_layers_below(model, cached, 1):
            out = model(x, output_attentions=output_attentions)
    assert torch.equal(out.logits, full.logits) and out.logits.shape == (2, 5, 4)
    assert out.attentions[:2] == [None, None]  # the stand-ins computed no attention
    if output_attentions:
        assert torch.equal(out.attentions[2], full.attentions[2])
    # block 2 ran once; blocks 0..1 at most once more in total (learning the output structure, once per class)
    added = [b.calls - c for b, c in zip(model.model.layers, calls)]
    assert added[2] == 1 and sum(added[:2]) <= 1
    assert _unpatched(model)


def test_a_forward_set_on_the_instance_is_put_back(tiny_model_dirs, tiny_tokenizer):
    """Wrappers such as accelerate's hooks set ``block.forward`` on the instance; it must survive."""
    model = _load(tiny_model_dirs["falcon"])
    batch = _batch(tiny_tokenizer, "left")
    block = get_decoder_layers(model)[0]
    seen = []
    original = block.forward

    def wrapped(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    block.forward = wrapped
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
        cached = capture_residual(model, [1], **batch, use_cache=False)[1]
        assert torch.equal(forward_from_layer(model, cached, 1, **batch), full)
    assert vars(block)["forward"] is wrapped
