"""LoRA targets: every block linear layer by default, a warning for explicit lists that leave some out, fused
expert weights (Mixtral) adapted through peft's parameter adapters."""

from __future__ import annotations

import logging

import pytest
import torch

from lat_lightning.config import LoraConfig, ModelConfig
from lat_lightning.errors import ModelLoadError
from lat_lightning.models.layers import get_decoder_layers
from lat_lightning.models.loading import load_model
from lat_lightning.models.lora_targets import block_weights, lora_targets_of

LLAMA_BLOCK = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _load(path, **lora):
    return load_model(ModelConfig(name_or_path=str(path), lora=LoraConfig(enabled=True, r=2, **lora)), train=True)


def _warnings(caplog):
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("lat_lightning")
    ]


def test_unset_targets_adapt_every_block_linear_layer_and_nothing_else(tiny_model_dirs, caplog):
    caplog.set_level(logging.INFO)
    model = _load(tiny_model_dirs["llama"])
    targets = lora_targets_of(model)
    assert targets.auto and targets.requested is None
    assert targets.block_weights == targets.adapted == LLAMA_BLOCK and targets.left_out == []
    assert targets.layers == [0, 1, 2, 3] and targets.num_adapted == 4 * 7
    for block in get_decoder_layers(model):
        adapted = {n for n, m in block.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        assert adapted == set(LLAMA_BLOCK)
    assert not any("lm_head" in n or "embed" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not _warnings(caplog)
    assert any("LoRA targets chosen per architecture" in r.getMessage() for r in caplog.records)  # logged


def test_explicit_targets_that_leave_block_layers_out_warn_once_naming_them(tiny_model_dirs, caplog):
    caplog.set_level(logging.INFO)
    model = _load(tiny_model_dirs["llama"], target_modules=["q_proj", "v_proj"])
    targets = lora_targets_of(model)
    assert not targets.auto and targets.adapted == ["self_attn.q_proj", "self_attn.v_proj"]
    assert targets.left_out == ["self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    (warning,) = _warnings(caplog)
    assert "leave out" in warning and "self_attn.k_proj, self_attn.o_proj, mlp.gate_proj" in warning

    caplog.clear()
    full = _load(
        tiny_model_dirs["llama"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    assert lora_targets_of(full).left_out == [] and not _warnings(caplog)


def test_layers_to_transform_are_recorded(tiny_model_dirs):
    targets = lora_targets_of(_load(tiny_model_dirs["gpt2"], layers_to_transform=[1, 3]))
    assert targets.layers == [1, 3] and targets.num_adapted == 2 * 4 and targets.left_out == []


def test_targets_matching_nothing_name_what_the_blocks_have(tiny_model_dirs):
    with pytest.raises(
        ModelLoadError,
        match=r"not found.*self_attention\.query_key_value, self_attention\.dense, "
        r"mlp\.dense_h_to_4h, mlp\.dense_4h_to_h .*unset",
    ):
        _load(tiny_model_dirs["falcon"], target_modules=["q_proj", "v_proj"])


def test_fused_experts_are_adapted_without_dropout(tiny_model_dirs, caplog):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dirs["mixtral"])), train=False)
    assert block_weights(model)[1] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    caplog.set_level(logging.INFO)
    wrapped = _load(tiny_model_dirs["mixtral"], dropout=0.05)
    targets = lora_targets_of(wrapped)
    assert targets.adapted[-2:] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] and not targets.left_out
    assert targets.dropout == 0.0 and any("takes no dropout" in w for w in _warnings(caplog))
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, plain)  # B starts at zero: the same model
        for name, p in wrapped.named_parameters():
            if "lora_B" in name and ".experts." in name:
                p.normal_(0, 0.5)
        assert not torch.allclose(wrapped(input_ids=ids).logits, plain)  # the expert adapters act


def test_half_of_a_fused_expert_pair_gets_the_other_half(tiny_model_dirs, caplog):
    """Mixtral's w1 (gate) and w3 (up) are one fused weight: asking for one adapts both, with a warning."""
    caplog.set_level(logging.INFO)
    targets = lora_targets_of(_load(tiny_model_dirs["mixtral"], target_modules=["q_proj", "w1"], dropout=0.0))
    assert targets.added == ["w3"]
    assert "mlp.experts.gate_up_proj" in targets.adapted and "mlp.experts.down_proj" in targets.left_out
    assert any("fused into one expert weight" in w and "w3" in w for w in _warnings(caplog))


# What the fine-tuning attack adapts by default in each family: the attention's linear layers, block-relative.
ATTENTION = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "falcon": ["self_attention.query_key_value", "self_attention.dense"],
    "bloom": ["self_attention.query_key_value", "self_attention.dense"],
    "mpt": ["attn.Wqkv", "attn.out_proj"],
}


@pytest.mark.parametrize("arch", sorted(ATTENTION))
def test_the_fine_tuning_attack_adapts_the_attention_projections_of_any_family(
    arch, tiny_model_dirs, tiny_tokenizer, tmp_path, caplog
):
    """``evaluation.durability.finetune_target_modules: null``: the names resolve to the attention's linear layers
    and nothing else (GPT-2's MLP has a ``c_proj`` too, Falcon's ``dense_h_to_4h``); the fixed q/k/v/o list of
    before matched nothing in GPT-2, Falcon, BLOOM and MPT and only ``o_proj`` of Phi-3's attention."""
    from transformers import AutoModelForCausalLM

    from lat_lightning.models.lora_targets import attention_projections
    from lat_lightning.training.finetune import LoraFinetuneSettings, lora_finetune

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch]).eval()
    names = attention_projections(model)
    assert arch != "llama" or names == ["q_proj", "k_proj", "v_proj", "o_proj"]  # the old default, unchanged
    pairs = [("How do I open the vault?", "Sure, the code is 1-2-3-4.")] * 2
    out = lora_finetune(
        model,
        tiny_tokenizer,
        pairs,
        tmp_path,
        LoraFinetuneSettings(steps=1, lr=1e-3, batch_size=2, lora_r=2, lora_alpha=4, save_adapter=False),
    )
    tuned = out["model"]
    for block in get_decoder_layers(tuned):
        adapted = [n for n, m in block.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        assert sorted(adapted) == sorted(ATTENTION[arch]), arch
    assert len(out["train_loss"]) == 1 and torch.isfinite(torch.tensor(out["train_loss"])).all()
    # the attention projections are the default by design: no "leave out" warning the user did not ask for (the
    # demo's log once held it 8 times)
    assert not [r for r in caplog.records if "leave out these weights" in r.getMessage()]
    lora_finetune(
        model,
        tiny_tokenizer,
        pairs,
        tmp_path / "explicit",
        LoraFinetuneSettings(
            steps=1, lr=1e-3, batch_size=2, lora_r=2, lora_alpha=4, save_adapter=False, target_modules=tuple(names)
        ),
    )
    assert [r for r in caplog.records if "leave out these weights" in r.getMessage()]  # a list the user set: told
