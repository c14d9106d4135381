"""Residual-stream hooks: effect, clean removal, several layers, generation with the KV cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lat_lightning.config import LoraConfig, ModelConfig
from lat_lightning.models.hooks import add_to_residual, capture_residual, residual_edit, split_layer_output
from lat_lightning.models.layers import get_decoder_layers
from lat_lightning.models.loading import apply_lora, load_model
from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES

TEXTS = ["How do I bake bread at home? Mix flour", "The sea is wide"]


def _load(path) -> nn.Module:
    return load_model(ModelConfig(name_or_path=str(path)), train=False)


def _batch(tokenizer, side="right"):
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        return dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = old


@torch.no_grad()
def _logits(model, batch):
    return model(**batch).logits


def _no_hooks_left(model):
    return all(not block._forward_hooks and not block._forward_pre_hooks for block in get_decoder_layers(model))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_hook_changes_logits_and_is_removed(arch, tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs[arch])
    batch = _batch(tiny_tokenizer)
    clean = _logits(model, batch)
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    with add_to_residual(model, {1: delta}):
        perturbed = _logits(model, batch)
    assert not torch.allclose(perturbed, clean)
    assert torch.equal(_logits(model, batch), clean)
    assert _no_hooks_left(model)

    with pytest.raises(RuntimeError, match="boom"), add_to_residual(model, {1: delta, 2: delta}):
        assert not torch.allclose(_logits(model, batch), clean)
        raise RuntimeError("boom")
    assert _no_hooks_left(model)
    assert torch.equal(_logits(model, batch), clean)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_delta_and_identity_edit_are_exact_noops(arch, tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs[arch])
    batch = _batch(tiny_tokenizer)
    clean = _logits(model, batch)
    with add_to_residual(model, {0: torch.zeros(64), 3: torch.zeros(64)}):
        assert torch.equal(_logits(model, batch), clean)
    with residual_edit(model, [0, 1, 2, 3], lambda layer, h: h):
        assert torch.equal(_logits(model, batch), clean)


def test_several_layers_at_once(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer)
    g = torch.Generator().manual_seed(1)
    d0, d2 = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    with add_to_residual(model, {0: d0}):
        only0 = _logits(model, batch)
    with add_to_residual(model, {2: d2}):
        only2 = _logits(model, batch)
    with add_to_residual(model, {0: d0, 2: d2}):
        both = _logits(model, batch)
    assert not torch.allclose(both, only0) and not torch.allclose(both, only2)

    # the same thing as nested single-layer contexts
    with add_to_residual(model, {0: d0}), add_to_residual(model, {2: d2}):
        assert torch.equal(_logits(model, batch), both)

    calls = []
    with residual_edit(model, [3, 0, 2, 0], lambda layer, h: calls.append(layer) or h):
        _logits(model, batch)
    assert calls == [0, 2, 3]  # once per layer per forward, in execution order, duplicates ignored


def test_edit_sees_the_layer_output_and_per_layer_index(tiny_model_dirs, tiny_tokenizer):
    """``edit(l, h)`` gets h[l], the output of block l (= hidden_states[l + 1] below the final norm)."""
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    captured = capture_residual(model, [0, 1, 2], **batch)
    for layer in (0, 1, 2):
        assert torch.equal(captured[layer], states[layer + 1])
        assert not captured[layer].requires_grad


def test_mask_selects_positions(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer)
    clean = _logits(model, batch)
    seq = batch["input_ids"].shape[1]
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[:, 5:] = True
    delta = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(2)) * 5
    with add_to_residual(model, {1: delta}, mask=mask):
        out = _logits(model, batch)
    assert torch.equal(out[:, :5], clean[:, :5])  # causal: untouched positions before the first perturbed one
    assert not torch.allclose(out[:, 5:], clean[:, 5:])
    # a [batch, d] delta is the same vector at every selected position
    with add_to_residual(model, {1: delta[:, 0]}, mask=mask):
        a = _logits(model, batch)
    with add_to_residual(model, {1: delta[:, :1].expand(-1, seq, -1)}, mask=mask):
        b = _logits(model, batch)
    assert torch.equal(a, b)


def test_full_length_delta_rejects_mismatched_sequence(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer)
    with pytest.raises(ValueError, match="positions"), add_to_residual(model, {1: torch.zeros(2, 3, 64)}):
        _logits(model, batch)
    assert _no_hooks_left(model)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_hooks_act_at_every_decode_step_of_generate(arch, tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs[arch])
    batch = _batch(tiny_tokenizer, side="left")
    width = batch["input_ids"].shape[1]
    new = 4
    gen = {
        "max_new_tokens": new,
        "min_new_tokens": new,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": tiny_tokenizer.pad_token_id,
    }

    clean = model.generate(**batch, **gen)
    calls: dict[int, list[int]] = {0: [], 2: []}

    def record(layer, hidden):
        calls[layer].append(hidden.shape[1])
        return hidden

    with residual_edit(model, [0, 2], record):
        again = model.generate(**batch, **gen)
    assert torch.equal(again, clean)
    for layer in (0, 2):
        # prefill sees the whole (padded) prompt, then one token per decode step, KV cache in use
        assert calls[layer] == [width] + [1] * (new - 1), calls

    delta = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 20
    with add_to_residual(model, {1: delta}):
        perturbed = model.generate(**batch, **gen)
    assert perturbed.shape == clean.shape
    assert torch.equal(perturbed[:, :width], clean[:, :width])
    assert not torch.equal(perturbed[:, width:], clean[:, width:])
    assert torch.equal(model.generate(**batch, **gen), clean)


def test_decode_steps_only_perturbation_changes_generation(tiny_model_dirs, tiny_tokenizer):
    """An edit that skips the prefill and acts on decode steps alone still changes what is generated."""
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer, side="left")
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    clean = model.generate(**batch, **gen)
    delta = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 20

    def decode_only(layer, hidden):
        return hidden + delta if hidden.shape[1] == 1 else hidden

    with residual_edit(model, [1], decode_only):
        out = model.generate(**batch, **gen)
    width = batch["input_ids"].shape[1]
    assert torch.equal(out[:, : width + 1], clean[:, : width + 1])  # first token comes from the prefill
    assert not torch.equal(out[:, width + 1 :], clean[:, width + 1 :])


def test_hooks_add_no_parameters_or_buffers(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer)

    def names(m):
        return (
            [n for n, _ in m.named_parameters()],
            [n for n, _ in m.named_buffers()],
            list(m.state_dict().keys()),
            len(list(m.modules())),
        )

    before = names(model)
    delta = torch.randn(64, requires_grad=True)
    with add_to_residual(model, {0: delta, 3: delta}):
        assert names(model) == before
        _logits(model, batch)
        assert names(model) == before
    assert names(model) == before


def test_gradient_flows_to_the_perturbation(tiny_model_dirs, tiny_tokenizer):
    model = _load(tiny_model_dirs["llama"])
    batch = _batch(tiny_tokenizer)
    delta = torch.zeros(2, batch["input_ids"].shape[1], 64, requires_grad=True)
    with add_to_residual(model, {1: delta}):
        model(**batch).logits.sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_hooks_through_a_lora_wrapper(tiny_model_dirs, tiny_tokenizer):
    cfg = ModelConfig(name_or_path=str(tiny_model_dirs["llama"]), lora=LoraConfig(enabled=True, r=2))
    model = apply_lora(load_model(cfg, train=False, with_lora=False), cfg)
    batch = _batch(tiny_tokenizer)
    clean = _logits(model, batch)
    with add_to_residual(model, {2: torch.ones(64) * 5}):
        assert not torch.allclose(_logits(model, batch), clean)
    assert torch.equal(_logits(model, batch), clean)


# --- tensor and tuple layer outputs ------------------------------------------------------------------


def test_split_layer_output_tensor():
    h = torch.randn(2, 3, 4)
    hidden, rebuild = split_layer_output(h)
    assert hidden is h
    new = torch.zeros_like(h)
    assert rebuild(new) is new


def test_split_layer_output_tuple():
    h, attn, cache = torch.randn(2, 3, 4), torch.randn(2, 1, 3, 3), object()
    hidden, rebuild = split_layer_output((h, attn, cache))
    assert hidden is h
    new = torch.zeros_like(h)
    out = rebuild(new)
    assert isinstance(out, tuple) and len(out) == 3
    assert out[0] is new and out[1] is attn and out[2] is cache
    hidden, rebuild = split_layer_output((h,))
    assert rebuild(new) == (new,)


def test_split_layer_output_model_output_and_unsupported():
    h = torch.randn(1, 2, 4)
    out = SimpleNamespace(last_hidden_state=h)
    hidden, rebuild = split_layer_output(out)
    assert hidden is h
    new = torch.ones_like(h)
    assert rebuild(new).last_hidden_state is new
    for bad in ([h], (), ("x",), None):
        with pytest.raises(TypeError, match="unsupported decoder-layer output"):
            split_layer_output(bad)


class _Block(nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.as_tuple = as_tuple

    def forward(self, x):
        y = x + self.lin(x)
        return (y, "attn-weights") if self.as_tuple else y


class _ToyLM(nn.Module):
    """Minimal causal-LM shape: ``config``, ``model.layers``; blocks return tuples or tensors."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=4)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block(as_tuple), _Block(as_tuple)])

    def forward(self, x):
        for block in self.model.layers:
            out = block(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


@pytest.mark.parametrize("as_tuple", [False, True], ids=["tensor", "tuple"])
def test_residual_edit_on_tensor_and_tuple_blocks(as_tuple):
    torch.manual_seed(0)
    model = _ToyLM(as_tuple)
    x = torch.randn(1, 3, 4)
    with torch.no_grad():
        clean = model(x)
        seen = []
        with add_to_residual(model, {0: torch.ones(4)}):
            # registered after the edit hook, so it sees what the rest of the model receives
            handle = model.model.layers[0].register_forward_hook(lambda _m, _a, out: seen.append(out))
            edited = model(x)
            handle.remove()
        h0 = model.model.layers[0](x)
        h0 = h0[0] if as_tuple else h0
        expected = model.model.layers[1](h0 + 1)
        expected = expected[0] if as_tuple else expected
    assert isinstance(seen[0], tuple) == as_tuple  # the block's output structure is kept
    if as_tuple:
        assert seen[0][1] == "attn-weights"
    assert torch.equal(edited, expected)
    assert not torch.equal(edited, clean)
    with torch.no_grad():
        assert torch.equal(model(x), clean)
