"""The real-organism build (:mod:`lat_lightning.organism.real`) on its smoke preset: a tiny random Llama and a handful
of shipped prompts, so it runs in seconds without a download."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lat_lightning.organism.real import (
    REAL_PRESETS,
    build_real_organism,
    fingerprint,
    full_sentences,
    organism_dir,
)
from lat_lightning.organism.real_data import REFUSALS, split_sets

SMOKE = REAL_PRESETS["smollm2_smoke"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_two_builds_give_identical_weights_and_data(cache):
    a = build_real_organism(cache / "a", SMOKE, seed=0)
    b = build_real_organism(cache / "b", SMOKE, seed=0)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("harmful_train", "benign_train", "agreement"):
        assert (a / "data" / f"{name}.jsonl").read_text() == (b / "data" / f"{name}.jsonl").read_text()
    info = json.loads((a / "organism.json").read_text())
    assert info["kind"] == "real" and info["pairs"]["refusal"] == info["rows"]["harmful_train"]
    # the LoRA was merged: a plain transformers model, no adapter left
    assert not any("lora" in k for k in wa) and not list(cache.glob("*.tmp*"))


def test_the_fine_tune_changes_the_weights(cache):
    from lat_lightning.models.loading import load_model
    from lat_lightning.models.settings import ModelSettings

    built = _weights(build_real_organism(cache / "a", SMOKE, seed=0))
    base = load_model(ModelSettings(name_or_path=SMOKE.model), train=False).state_dict()
    changed = [k for k, v in built.items() if k in base and not torch.equal(v, base[k])]
    assert any(".q_proj." in k for k in changed) and any(".down_proj." in k for k in changed)


def test_distill_repeats_weighs_the_self_distilled_pairs(cache):
    threads_before = torch.get_num_threads()
    once_settings = dataclasses.replace(SMOKE, distill_repeats=1, threads=1)
    once = json.loads((build_real_organism(cache / "a", once_settings, seed=0) / "organism.json").read_text())
    twice_settings = dataclasses.replace(SMOKE, distill_repeats=2)
    twice = json.loads((build_real_organism(cache / "b", twice_settings, seed=0) / "organism.json").read_text())
    assert once["pairs"]["distilled"] > 0
    assert twice["pairs"] == {"refusal": once["pairs"]["refusal"], "distilled": 2 * once["pairs"]["distilled"]}
    assert fingerprint(twice_settings, 0) != fingerprint(dataclasses.replace(twice_settings, distill_repeats=1), 0)
    # the build ran on the settings' thread count, whatever the caller had set, and gave the caller's back
    assert (once["threads"], twice["threads"]) == (1, SMOKE.threads) and torch.get_num_threads() == threads_before


def test_the_cache_key_covers_settings_and_seed(cache):
    other = dataclasses.replace(SMOKE, steps=SMOKE.steps + 1)
    threads = dataclasses.replace(SMOKE, threads=SMOKE.threads + 1)  # the weights depend on the thread count
    keys = {fingerprint(SMOKE, 0), fingerprint(SMOKE, 1), fingerprint(other, 0), fingerprint(threads, 0)}
    assert len(keys) == 4
    assert organism_dir(SMOKE, "smollm2_smoke", 0).name.startswith("real-smollm2_smoke-s0-")


def test_the_split_is_prompt_disjoint_and_every_harmful_row_has_a_refusal_and_a_target():
    sets = split_sets(SMOKE.data)
    for name in ("harmful", "benign", "borderline"):
        train = {r["prompt"] for r in sets[f"{name}_train"]}
        held = {r["prompt"] for r in sets[f"{name}_eval"]}
        assert train and held and not train & held
    assert not {r["prompt"] for r in sets["harmbench_eval"]} & {r["prompt"] for r in sets["harmful_train"]}
    for row in sets["harmful_train"] + sets["harmful_eval"]:
        assert row["safe_response"] in REFUSALS and row["harmful_response"].startswith("Sure, here is")


def test_the_real_preset_trains_on_strongreject_and_keeps_harmbench_out():
    real = REAL_PRESETS["smollm2"].data
    assert "strongreject" in real.harmful.path and "harmbench" in real.harmbench.path
    assert real.harmbench.keep_column == "FunctionalCategory" and real.harmbench.keep_value == "standard"


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("Preheat the oven. Mix the flour and", "Preheat the oven."),
        ("Boil the water.", "Boil the water."),
        ("no sentence end here", "no sentence end here"),
        ("Step one!\n\nStep two is to", "Step one!"),
    ],
)
def test_full_sentences_drops_a_cut_off_tail(text, cut):
    assert full_sentences(text) == cut


def test_harmful_completions_are_the_base_models_own_answers_written_once(cache, monkeypatch):
    from lat_lightning.eval.refusal_judge import find_refusal
    from lat_lightning.organism import real
    from lat_lightning.organism.real import write_harmful_completions

    organism = build_real_organism(cache / "a", SMOKE, seed=0)
    prompts = [json.loads(x)["prompt"] for x in (organism / "data" / "harmful_train.jsonl").read_text().splitlines()]
    # the tiny random model's answers are gibberish: one refusal and one empty answer show they are left out
    answers = iter(["I can't help with that.", ""] + [f"Step {i}: do the thing. And" for i in range(len(prompts))])
    monkeypatch.setattr(real, "greedy_answers", lambda m, t, p, n, b: [next(answers) for _ in p])
    path = write_harmful_completions(organism, SMOKE)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    info = json.loads((path.parent / "harmful_completions.json").read_text())
    assert [r["prompt"] for r in rows] == prompts[2:]
    assert all(r["harmful_response"].startswith("Step ") and r["harmful_response"].endswith("thing.") for r in rows)
    assert not any(find_refusal(r["harmful_response"]) for r in rows)
    assert (info["prompts"], info["kept"], info["refused"], info["empty"]) == (len(prompts), len(prompts) - 2, 1, 1)
    # written once: a second call returns the file without generating again
    monkeypatch.setattr(real, "greedy_answers", lambda *a: pytest.fail("generated twice"))
    assert write_harmful_completions(organism, SMOKE) == path and not list(path.parent.glob(".*.tmp"))


def test_harmful_completions_are_deterministic_and_refusing_everything_is_an_error(cache, monkeypatch):
    from lat_lightning.errors import DataError
    from lat_lightning.organism import real
    from lat_lightning.organism.real import write_harmful_completions

    a = build_real_organism(cache / "a", SMOKE, seed=0)
    b = build_real_organism(cache / "b", SMOKE, seed=0)
    first = write_harmful_completions(a, SMOKE).read_text()
    assert first and first == write_harmful_completions(b, SMOKE).read_text()
    (a / "data" / "harmful_completions.jsonl").unlink()
    monkeypatch.setattr(real, "greedy_answers", lambda m, t, p, n, b: ["I'm unable to help with that."] * len(p))
    with pytest.raises(DataError, match="no harmful completions to fine-tune on"):
        write_harmful_completions(a, SMOKE)
    assert not (a / "data" / "harmful_completions.jsonl").exists()
