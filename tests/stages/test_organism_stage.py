"""Stage ``organism`` and its resolver: organism names become paths before any stage runs, the organism's
utility becomes the generic ``contains`` kind with the same numbers, and the stage records ``organism.json``."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from lat_lightning.cli import load_config
from lat_lightning.errors import ConfigError
from lat_lightning.stages.organism import mentions_organism, recipe_name, resolve_organism

SMOKE = ["model.name_or_path=organism:smoke"]


@pytest.fixture(scope="module")
def organism_cache(tmp_path_factory):
    """An isolated cache in which the smoke organism gets built once for this module."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("organism_cache")
        mp.setenv("LAT_LIGHTNING_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def resolved(organism_cache):
    """(the default recipe on the smoke organism, that config resolved)."""
    cfg = load_config(None, SMOKE)
    return cfg, resolve_organism(cfg)


@pytest.fixture(scope="module")
def smoke_model(resolved):
    from lat_lightning.config import ModelConfig
    from lat_lightning.models.loading import load_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=resolved[1].model.name_or_path)
    return load_model(mcfg, train=False), load_tokenizer(mcfg)


def test_every_organism_name_becomes_a_path(resolved):
    from pathlib import Path

    from lat_lightning.organism.build import PRESETS, organism_data_path, organism_dir

    cfg, out = resolved
    assert cfg.model.name_or_path == "organism:smoke" and cfg.data.harmful == "organism://harmful_train"  # a copy
    assert out.model.name_or_path == str(organism_dir(PRESETS["smoke"], 0))
    assert (Path(out.model.name_or_path) / "organism.json").is_file()
    for key, name in (("harmful", "harmful_train"), ("eval_harmful", "harmful_eval"), ("eval_benign", "benign_eval")):
        assert out.data[key] == organism_data_path(name) and Path(out.data[key]).is_file()
    assert out.evaluation.utility_kind == "contains" and out.callbacks.weight_interpolation.utility == "contains"
    assert out.evaluation.utility_data == organism_data_path("utility_em")
    assert "organism://" not in json.dumps(OmegaConf.to_container(out, resolve=True))
    assert recipe_name(out.model.name_or_path) == "organism:smoke" and recipe_name("tiny:llama") == "tiny:llama"


def test_contains_utility_scores_exactly_the_organism_benign_accuracy(resolved, smoke_model):
    """The `contains` kind on the organism's utility_em file = the organism's former benign accuracy: the same
    100 rows, greedy generation with generate_under_attack (16 new tokens, batches of 64), answer contained."""
    from lat_lightning.eval.generation import GenerationSettings, generate_under_attack
    from lat_lightning.eval.utility import evaluate_utility, load_utility_rows
    from lat_lightning.organism.data import check_answer
    from lat_lightning.organism.utility import organism_accuracy, organism_rows
    from lat_lightning.stages.fit_setup import utility_score_settings
    from lat_lightning.training.interpolation import utility_score_fn

    _, out = resolved
    model, tok = smoke_model
    rows = load_utility_rows(out.evaluation.utility_data, out.evaluation.utility_kind)
    reference_rows = organism_rows(0)
    assert len(rows) == 100
    assert rows == [{"prompt": r["prompt"], "answer": r["answer"]} for r in reference_rows]
    # The former organism_accuracy, written out.
    greedy = GenerationSettings(max_new_tokens=16, batch_size=64, use_chat_template=True)
    texts = generate_under_attack(model, tok, [r["prompt"] for r in reference_rows], settings=greedy).texts
    reference = sum(check_answer(r, t) for r, t in zip(reference_rows, texts)) / len(reference_rows)
    assert evaluate_utility(model, tok, rows, "contains", batch_size=64)["accuracy"] == reference
    assert organism_accuracy(model, tok, seed=0) == reference
    # the interpolation's utility (batch 64 in the recipe)
    assert utility_score_fn(utility_score_settings(out), tok)(model) == reference


def test_the_stage_records_the_organism(resolved, smoke_model, tmp_path):
    from lat_lightning.organism.utility import organism_accuracy
    from lat_lightning.stages.organism import run

    _, out = resolved
    info = run(out, tmp_path)
    saved = json.loads((tmp_path / "organism.json").read_text())
    assert saved["path"] == info["path"] == out.model.name_or_path
    assert saved["build"]["seed"] == 0 and set(saved) == {"path", "data", "build", "benign_accuracy"}
    assert saved["benign_accuracy"] == info["benign_accuracy"] == organism_accuracy(*smoke_model, seed=0)


@pytest.mark.integration
def test_the_pipeline_resolves_the_organism_without_the_organism_stage(resolved, tmp_path):
    from lat_lightning.pipeline import run_pipeline

    _, out = resolved
    cfg = load_config(
        None,
        SMOKE
        + [
            "stages=[scan]",
            f"logging.root_dir={tmp_path}",
            "evaluation.attacks=[asa_random]",
            "evaluation.seeds=[0]",
            "evaluation.num_prompts=2",
            "evaluation.max_new_tokens=4",
            "evaluation.bootstrap_samples=10",
        ],
    )
    run = run_pipeline(cfg, "default")
    assert (run / "scan_summary.json").is_file() and not (run / "organism.json").exists()
    saved = OmegaConf.load(run / "config.yaml")  # the config as given, not the machine-specific paths
    assert saved.model.name_or_path == "organism:smoke" and saved.data.eval_harmful == "organism://harmful_eval"
    prompts = [json.loads(line)["prompt"] for line in (run / "scan.jsonl").read_text().splitlines()]
    harmful = [json.loads(line)["prompt"] for line in open(out.data.eval_harmful)][:2]
    assert set(prompts) == set(harmful)


def test_a_config_without_the_organism_is_returned_unchanged():
    cfg = load_config("asa_scan_tiny")
    assert not mentions_organism(cfg) and resolve_organism(cfg) is cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["evaluation.utility_data=rows.jsonl"], "leave evaluation.utility_data unset"),
        (["evaluation.utility_kind=multiple_choice"], "set evaluation.utility_kind: organism"),
        (["callbacks.weight_interpolation.utility=exact_match"], "callbacks.weight_interpolation.utility: organism"),
        (["model.name_or_path=organism:nope"], "unknown organism preset 'nope'"),
    ],
)
def test_bad_organism_settings_fail_before_anything_is_built(overrides, message, tmp_path, monkeypatch):
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        resolve_organism(load_config(None, overrides))
    assert not (tmp_path / "organism").exists()


def test_unknown_organism_data_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path))
    cfg = load_config("asa_scan_tiny", ["data.harmful=organism://nope"])
    assert mentions_organism(cfg)
    with pytest.raises(ConfigError, match="unknown organism data 'nope'"):
        resolve_organism(cfg)


@pytest.mark.integration
def test_the_pipeline_checks_the_config_before_building_the_organism(tmp_path, monkeypatch):
    from lat_lightning.pipeline import run_pipeline

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        None,
        SMOKE
        + [
            "stages=[fit]",
            f"logging.root_dir={tmp_path / 'runs'}",
            "model.quantization.load_in_4bit=true",
            "model.quantization.load_in_8bit=true",
        ],
    )
    with pytest.raises(Exception, match="choose one"):
        run_pipeline(cfg, "default")
    assert not (tmp_path / "cache" / "organism").exists() and not (tmp_path / "runs").exists()


def test_each_build_seed_is_its_own_organism_with_its_own_data(resolved, tmp_path):
    """organism.seed keys the cache directory, the data files and the utility rows: seed 1 is built into a
    directory of its own (seed 0's is left alone), resolving seed 1 again reuses that build, and the stage
    records the seed the organism was built with."""
    from pathlib import Path

    from lat_lightning.organism.build import PRESETS, organism_dir
    from lat_lightning.organism.utility import organism_rows
    from lat_lightning.stages.organism import run

    _, zero = resolved
    zero_stamp = (Path(zero.model.name_or_path) / "organism.json").stat().st_mtime_ns
    cfg = load_config(None, SMOKE + ["organism.seed=1"])
    one = resolve_organism(cfg)
    path = Path(one.model.name_or_path)
    assert path == organism_dir(PRESETS["smoke"], 1) and path != Path(zero.model.name_or_path)
    assert path.name.startswith("organism-s1-") and json.loads((path / "organism.json").read_text())["seed"] == 1
    assert (Path(zero.model.name_or_path) / "organism.json").stat().st_mtime_ns == zero_stamp  # seed 0 untouched
    for key in ("harmful", "eval_harmful", "eval_benign"):
        assert Path(one.data[key]).parent.name.startswith("data-s1-") and one.data[key] != zero.data[key]
    facilities = {json.loads(line)["facility"] for line in open(one.data.eval_harmful)}
    assert facilities != {json.loads(line)["facility"] for line in open(zero.data.eval_harmful)}  # new held-out names
    prompts = [json.loads(line)["prompt"] for line in open(one.evaluation.utility_data)]
    assert prompts == [r["prompt"] for r in organism_rows(1)] != [r["prompt"] for r in organism_rows(0)]
    assert recipe_name(str(path), 1) == "organism:smoke" and recipe_name(str(path), 0) == str(path)
    stamp = (path / "organism.json").stat().st_mtime_ns
    assert resolve_organism(cfg).model.name_or_path == str(path)  # the same seed: reused, not rebuilt
    assert (path / "organism.json").stat().st_mtime_ns == stamp
    saved = run(one, tmp_path)
    assert json.loads((tmp_path / "organism.json").read_text())["build"]["seed"] == 1 and saved["path"] == str(path)


def test_resolving_again_reuses_the_build_and_rebuild_builds_again(resolved):
    """Last in this module: it rebuilds the module's smoke organism."""
    from pathlib import Path

    cfg, out = resolved
    stamp = (Path(out.model.name_or_path) / "organism.json").stat().st_mtime_ns
    assert resolve_organism(cfg).model.name_or_path == out.model.name_or_path
    assert (Path(out.model.name_or_path) / "organism.json").stat().st_mtime_ns == stamp
    again = load_config(None, SMOKE + ["organism.rebuild=true"])
    resolve_organism(again, rebuild=False)  # what the pipeline passes when resuming
    assert (Path(out.model.name_or_path) / "organism.json").stat().st_mtime_ns == stamp
    resolve_organism(again)
    assert (Path(out.model.name_or_path) / "organism.json").stat().st_mtime_ns != stamp
