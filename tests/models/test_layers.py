"""Decoder-layer access for every supported architecture, bare and through wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lat_lightning.config import LoraConfig, ModelConfig
from lat_lightning.models.layers import (
    SUPPORTED_ARCHITECTURES,
    check_layer_indices,
    get_decoder_layers,
    hidden_size,
    num_layers,
    unwrap_model,
)
from lat_lightning.models.loading import apply_lora, load_model
from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES, tiny_config

# Attention projections LoRA can target in each architecture (module names differ between families).
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
}

BLOCK_CLASSES = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "gemma": "GemmaDecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
    "gpt2": "GPT2Block",
    "gpt_neox": "GPTNeoXLayer",
    "falcon": "FalconDecoderLayer",
    "bloom": "BloomBlock",
    "mpt": "MptBlock",
    "qwen3": "Qwen3DecoderLayer",
    "gemma3": "Gemma3DecoderLayer",
    "olmo2": "Olmo2DecoderLayer",
    "phi": "PhiDecoderLayer",
    "mixtral": "MixtralDecoderLayer",
    "llama4": "Llama4TextDecoderLayer",
}


def _load(path) -> nn.Module:
    return load_model(ModelConfig(name_or_path=str(path)), train=False)


def test_tiny_kit_covers_every_supported_architecture():
    assert set(TINY_ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES) == set(BLOCK_CLASSES)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_decoder_layers_bare_and_through_lora(arch, tiny_model_dirs):
    model = _load(tiny_model_dirs[arch])
    layers = get_decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers(model) == 4
    assert all(type(block).__name__ == BLOCK_CLASSES[arch] for block in layers)
    assert hidden_size(model) == 64

    cfg = ModelConfig(
        name_or_path=str(tiny_model_dirs[arch]),
        lora=LoraConfig(enabled=True, r=2, alpha=4, target_modules=LORA_TARGETS[arch]),
    )
    wrapped = apply_lora(model, cfg)
    assert type(wrapped).__name__.startswith("Peft")
    assert unwrap_model(wrapped) is model
    assert get_decoder_layers(wrapped) is layers
    assert num_layers(wrapped) == 4 and hidden_size(wrapped) == 64


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_sizes_come_from_the_config(arch, tiny_tokenizer):
    """A model of another shape reports that shape: nothing is hard-coded."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=len(tiny_tokenizer), num_layers=3, hidden=32, heads=2)
    model = AutoModelForCausalLM.from_config(config)
    assert num_layers(model) == 3
    assert hidden_size(model) == 32
    assert len(get_decoder_layers(model)) == 3
    # the hidden size is the width of the residual stream the layers really produce
    seen = {}
    handle = get_decoder_layers(model)[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    handle.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert out.shape[-1] == 32


def test_fsdp1_and_ddp_style_wrappers_are_unwrapped(tiny_model_dirs):
    model = _load(tiny_model_dirs["llama"])
    layers = get_decoder_layers(model)

    class FakeFSDP(nn.Module):  # FSDP1 keeps the wrapped module under this attribute
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    class DistributedDataParallel(nn.Module):  # matched by class name, like torch's DDP
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert get_decoder_layers(FakeFSDP(model)) is layers
    assert get_decoder_layers(DistributedDataParallel(FakeFSDP(model))) is layers


class _Cfg:
    def __init__(self, n):
        self.num_hidden_layers = n
        self.hidden_size = 8


class _UnknownArch(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.config = _Cfg(n)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))


def test_unknown_architecture_falls_back_to_the_only_matching_modulelist():
    model = _UnknownArch()
    assert get_decoder_layers(model) is model.blocks


def test_unknown_architecture_without_layers_raises():
    model = _UnknownArch()
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="cannot locate the decoder layers"):
        get_decoder_layers(model)


@pytest.mark.parametrize("bad", [-1, 4, 100, True, 1.0])
def test_check_layer_indices_names_the_valid_range(bad, tiny_model_dirs):
    model = _load(tiny_model_dirs["llama"])
    with pytest.raises(IndexError, match=r"0\.\.3"):
        check_layer_indices(model, [0, bad])
    assert check_layer_indices(model, [0, 3]) == [0, 3]
