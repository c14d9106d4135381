"""``embed`` as an attackable layer: a perturbation of the input embeddings (``inputs_embeds``), for every attack,
in training, generation and the scan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from lat_lightning.attacks import build_attack
from lat_lightning.attacks.positions import position_mask
from lat_lightning.config import ModelConfig, PerturbationConfig
from lat_lightning.models.forward_from_layer import forward_from_layer
from lat_lightning.models.hooks import add_to_residual, capture_residual
from lat_lightning.models.layers import EMBED, check_layer_indices, layer_name, parse_layers
from lat_lightning.models.loading import load_model
from tests.helpers.batches import safety_batch


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_embed_hook_is_a_perturbation_of_inputs_embeds(arch, tiny_model_dirs, tiny_tokenizer):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dirs[arch])), train=False)
    ids = torch.tensor([[5, 17, 42, 9, 11]])
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        expected = model(inputs_embeds=embeds + delta).logits
        with add_to_residual(model, {EMBED: delta}):
            got = model(input_ids=ids).logits
        clean = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, clean)
    captured = capture_residual(model, [EMBED], input_ids=ids)[EMBED]
    torch.testing.assert_close(captured, embeds)
    torch.testing.assert_close(forward_from_layer(model, captured, EMBED, ids), clean)  # inputs_embeds path


def test_layer_names_and_parsing(tiny_llama):
    model, _ = tiny_llama
    assert parse_layers(["embed", 2, "3"]) == [EMBED, 2, 3]
    assert check_layer_indices(model, ["embed", 1]) == [EMBED, 1]
    assert parse_layers(["embed", "all"]) == [EMBED, "all"]  # "all" waits for the model to know its depth
    assert check_layer_indices(model, parse_layers(["embed", "all"])) == [EMBED, 0, 1, 2, 3]
    assert layer_name(EMBED) == "embed" and layer_name(3) == "3"
    for bad in ([-1], [-2], ["emb"], [1.5]):
        with pytest.raises(ValueError, match="embed"):
            parse_layers(bad, "perturbation.layers")


def test_config_accepts_embed_and_refuses_negative_layers():
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError

    cfg = load_config("lat_tiny", ["perturbation.layers=[embed,2]", "evaluation.layers=[embed,0]"])
    assert list(cfg.perturbation.layers) == ["embed", 2]
    with pytest.raises(ConfigError, match="'embed' for the input embeddings"):
        load_config("lat_tiny", ["perturbation.layers=[-2]"])
    with pytest.raises(ConfigError, match="callbacks.fragile_layers.candidate_layers"):
        load_config("lat_tiny", ["callbacks.fragile_layers.candidate_layers=[embedding]"])


def _pgd(**kw):
    base = {"attack": "pgd", "steps": 3, "eps": 0.5, "lr": 0.5, "positions": "prompt"}
    return build_attack(
        "pgd", OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PerturbationConfig), {**base, **kw}))
    )


@pytest.mark.parametrize("eps_mode,eps", [("absolute", 0.05), ("relative", 0.3)])
def test_embedding_pgd_stays_within_eps_and_lowers_the_loss(tiny_llama, eps_mode, eps):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    attack = _pgd(eps=eps, eps_mode=eps_mode, steps=4)
    clean = capture_residual(
        model, [EMBED], input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"]
    )[EMBED]
    seen = []

    def check(step, deltas):
        seen.append(step)
        delta = deltas[EMBED]
        mask = position_mask("prompt", batch["prompt_lengths"], delta.shape[1])
        assert torch.all(delta[~mask] == 0)
        radius = eps if eps_mode == "absolute" else eps * clean.float().norm(dim=-1, keepdim=True)
        assert torch.all(delta.norm(dim=-1, keepdim=True) <= radius * (1 + 1e-5) + 1e-7)

    attack.step_callback = check
    pert = attack.make(model, batch, [EMBED, 2])
    assert seen == [0, 1, 2, 3] and sorted(pert.vectors) == [EMBED, 2]
    assert pert.stats["attack_loss_after"] < pert.stats["attack_loss_before"]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["asa_random", "asagrad", "pgd"])
def test_every_attack_perturbs_the_embeddings_in_generation(tiny_llama, name):
    from lat_lightning.eval.generation import GenerationSettings, encode_prompts, generate_under_attack

    model, tok = tiny_llama
    settings = dataclasses.replace(
        PerturbationConfig(), positions="prompt_last_and_generated", steps=2, eps=0.5, lr=0.5, alpha=3.0
    )
    attack = build_attack(name, settings)
    prompts = encode_prompts(tok, ["How do I open the vault?", "Tell me the code."])
    targets = [tok("Sure, here it is")["input_ids"]] * 2
    plan = attack.plan(model, prompts, targets, [0, 1, 0], [EMBED, EMBED, -1], seed=0)
    res = generate_under_attack(
        model,
        tok,
        [prompts[0], prompts[1], prompts[0]],
        [EMBED, EMBED, -1],
        plan,
        settings=GenerationSettings(max_new_tokens=6),
    )
    assert res.perturbed_positions[0] > 0 and res.perturbed_positions[1] > 0 and res.perturbed_positions[2] == 0
    assert res.token_ids[0] != res.token_ids[2]  # the attacked row of prompt 0 differs from its clean row


def test_scan_covers_the_embeddings_and_names_them(tiny_llama, tmp_path):
    from scan_helpers import scan

    model, tok = tiny_llama
    res = scan(
        model,
        tok,
        ["How do I open the vault?", "Tell me the code."],
        ["Sure, 1-2-3-4.", "Sure, 5-6."],
        ["embed", 1],
        ["asa_random", "pgd"],
        [0],
        ["keyword"],
        tmp_path,
        perturbation=dataclasses.replace(PerturbationConfig(), steps=2, eps=0.5, lr=0.5),
        max_new_tokens=4,
        bootstrap_samples=0,
        figures=True,
        tensorboard=False,
        progress=False,
        asabench_test_fraction=None,
    )
    assert res.layers == [EMBED, 1]
    assert {(r["attack"], r["layer"]) for r in res.records.values() if r["attack"] != "clean"} == {
        ("asa_random", EMBED),
        ("asa_random", 1),
        ("pgd", EMBED),
        ("pgd", 1),
    }
    assert res.summary["layer_names"] == ["embed", "1"]
    report = (tmp_path / "scan_report.md").read_text()
    assert "| embed |" in report  # the LASR table names the layer


def test_embed_trains(tiny_llama, tiny_tokenizer, tmp_path):
    import lightning.pytorch as pl

    from lat_lightning.config import RunConfig
    from lat_lightning.stages.fit_setup import build_module, validate_setup

    model, _ = tiny_llama
    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "perturbation": {"attack": "pgd", "layers": ["embed", 2], "positions": "prompt", "steps": 2, "eps": 0.1},
            "trainer": {"max_steps": 1, "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
        },
    )
    validate_setup(cfg, model)
    module = build_module(cfg, model, tiny_tokenizer)
    assert module.attack_layers == [EMBED, 2]
    batch = safety_batch(tiny_tokenizer, n=2)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
