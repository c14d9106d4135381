"""Every decoder family of the tiny-model kit runs the framework's main paths: a layer scan (ASA random, ASAgrad,
PGD), and one PGD and one Gaussian (ASA random) training step, with and without LoRA; LoRA adapts every linear
layer of the decoder blocks by default. (Hooks and forward-from-layer per family: test_hooks.py,
test_forward_from_layer.py.)"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from scan_helpers import scan

from lat_lightning.config import LoraConfig, ModelConfig, RunConfig
from lat_lightning.models.loading import load_model
from lat_lightning.models.lora_targets import lora_targets_of
from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES
from lat_lightning.stages.fit_setup import build_module
from tests.helpers.batches import safety_batch

# The default LoRA targets per family (docs/models.md shows the same table): every linear layer of a block and
# Mixtral's fused expert weights.
LLAMA_STYLE = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
FALCON_STYLE = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
DEFAULT_TARGETS = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "gemma": LLAMA_STYLE,
    "gemma2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "gemma3": LLAMA_STYLE,
    "olmo2": LLAMA_STYLE,
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "falcon": FALCON_STYLE,
    "bloom": FALCON_STYLE,
    "mpt": ["attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj"],
    "phi": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"],
    "mixtral": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    ],
    # Llama-4 text: every block a mixture of experts (a shared MLP, fused routed experts; the router, a linear
    # layer whose forward returns a tuple, is left out)
    "llama4": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "feed_forward.shared_expert.gate_proj",
        "feed_forward.shared_expert.up_proj",
        "feed_forward.shared_expert.down_proj",
        "feed_forward.experts.gate_up_proj",
        "feed_forward.experts.down_proj",
    ],
}
PROMPTS = ["How do I open the vault at Zorvan?", "Tell me the code"]
TARGETS = ["Sure, the code is 4-1-7-2.", "Sure: 9-3-3-0."]


def test_the_table_covers_the_kit():
    assert set(DEFAULT_TARGETS) == set(TINY_ARCHITECTURES) and len(TINY_ARCHITECTURES) >= 16


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_scan(arch, tiny_model_dirs, tiny_tokenizer):
    """Two prompts x two layers, every attack: every cell generated and judged; the clean answer is the
    model's own greedy continuation, and attacks at layer 0 change some answer."""
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dirs[arch])), train=False)
    settings = RunConfig().perturbation
    settings.steps, settings.eps, settings.lr, settings.optimizer, settings.alpha = 2, 4.0, 1.0, "sign", 3.0
    result = scan(
        model,
        tiny_tokenizer,
        PROMPTS,
        TARGETS,
        layers=[0, 3],
        attacks=["asa_random", "asagrad", "pgd"],
        seeds=[0],
        judges=["keyword"],
        perturbation=settings,
        max_new_tokens=3,
        batch_size=16,
        bootstrap_samples=0,
        progress=False,
        figures=False,
        tensorboard=False,
        asabench_test_fraction=None,
    )
    attacked = [r for r in result.records.values() if r["attack"] != "clean"]
    assert len(attacked) == 3 * 2 * 2 and len(result.records) == len(attacked) + 2
    for attack in ("asa_random", "asagrad", "pgd"):
        matrix = result.matrix(attack)
        assert matrix.shape == (2, 2) and not torch.isnan(torch.as_tensor(matrix)).any(), attack
    for attack in ("asa_random", "asagrad", "pgd"):
        assert any(
            r["response"] != result.clean_responses[r["prompt_idx"]]
            for r in attacked
            if r["attack"] == attack and r["layer"] == 0
        ), attack


def _module(arch, dirs, tokenizer, attack: str, lora: bool):
    model = load_model(
        ModelConfig(name_or_path=str(dirs[arch]), lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0)), train=True
    )
    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "perturbation": {
                "attack": attack,
                "layers": [1],
                "positions": "prompt" if attack == "pgd" else "response",
                "steps": 2,
                "eps": 1.0,
                "lr": 0.5,
                "optimizer": "sign",
            },
            "loss": {"toward_safe": 1.0, "away_from_harmful": 0.5},
        },
    )
    return build_module(cfg, model, tokenizer), model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_attacks_training_step(arch, lora, tiny_model_dirs, tiny_tokenizer):
    """One step of every registered attack (issue 24: PGD once crashed on Llama-4 text): the perturbation is where
    and how large it should be, the loss is finite, exactly the trainable weights move."""
    from lat_lightning.attacks import attack_names

    batch = safety_batch(tiny_tokenizer, n=2, with_benign=True)  # the refusal direction's harmless side
    for attack in attack_names(scan=True):
        module, model = _module(arch, tiny_model_dirs, tiny_tokenizer, attack, lora)
        if lora:
            targets = lora_targets_of(model)
            assert targets.auto and targets.adapted == DEFAULT_TARGETS[arch] and targets.left_out == []
            assert targets.layers == [0, 1, 2, 3]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
        perturbation = module.run_attack(batch)
        vectors = perturbation.vectors[1]
        assert vectors.abs().sum() > 0, f"{arch} {attack}: nothing at the attacked layer"
        mask = perturbation.layer_mask(1).bool()
        if vectors.dim() == 3:  # per-position vectors (ASA, ASAgrad, PGD; a refusal direction is one [d] vector)
            assert vectors[mask].abs().sum() > 0
        if attack == "pgd":
            assert not perturbation.normalise
            assert float(vectors[mask].norm(dim=-1).max()) <= 1.0 + 1e-5  # the eps ball
            for row, length in enumerate(batch["prompt_lengths"].tolist()):  # prompt positions only
                assert mask[row, :length].any() and not mask[row, length:].any()
        terms = module.defence_losses(batch, perturbation)
        total = torch.stack(list(terms.values())).sum()
        assert torch.isfinite(total), f"{arch} {attack}: {terms}"
        total.backward()
        opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert moved and moved <= trainable, f"{arch} {attack}"
        if lora:
            assert all("lora_" in n for n in moved)
