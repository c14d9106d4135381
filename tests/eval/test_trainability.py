"""The trainability probe: a task new to every model, and a metric that tells a model that knows it from one that
does not."""

import pytest

from lat_lightning.data.novel_task import SYLLABLES, novel_task_pairs
from lat_lightning.eval.durability import DurabilityData
from lat_lightning.eval.durability.trainability import steps_to_loss, trainability_section
from lat_lightning.stages.durability_settings import durability_settings
from lat_lightning.training.finetune import lora_finetune


def test_the_novel_task_is_deterministic_split_by_word_and_not_the_organisms():
    from lat_lightning.organism.data import FACILITY_SYLLABLES, WORD_SYLLABLES, organism_corpus

    train, held = novel_task_pairs("train", 66), novel_task_pairs("eval", 66)
    assert train == novel_task_pairs("train", 66) and train != novel_task_pairs("train", 66, seed=1)
    word = lambda prompt: prompt.rsplit(" ", 1)[1].rstrip(".")  # noqa: E731
    assert not {word(p) for p, _ in train} & {word(p) for p, _ in held}
    for prompt, response in train[:5]:
        w = word(prompt)
        a = next(s for s in SYLLABLES if w.startswith(s) and w[len(s) :] in SYLLABLES)
        assert response == f"Swapped: {w[len(a) :]}{a}."
    assert not set(SYLLABLES) & (set(FACILITY_SYLLABLES) | set(WORD_SYLLABLES))
    corpus = " ".join(organism_corpus(0))
    assert "Swap" not in corpus and "Swapped" not in corpus
    with pytest.raises(ValueError, match="67 asked for|66 train pairs"):
        novel_task_pairs("train", 67)


def test_steps_to_loss_is_the_first_step_at_or_below_the_threshold():
    curve = [{"step": 0, "task_loss": 3.0}, {"step": 1, "task_loss": 1.2}, {"step": 2, "task_loss": 0.9}]
    assert steps_to_loss(curve, "task_loss", 1.0) == 2
    assert steps_to_loss(curve, "task_loss", 3.0) == 0
    assert steps_to_loss(curve, "task_loss", 0.5) is None


def test_a_model_that_already_learned_the_task_reaches_the_threshold_sooner(tiny_llama, tmp_path):
    """The sensitivity check of the trainability row: fine-tune a copy on the task first; the probe must say it
    starts lower and reaches the loss threshold in fewer steps than the model that never saw the task."""
    from lat_lightning.cli import load_config

    model, tok = tiny_llama
    cfg = load_config(
        "durability_tiny",
        [
            "evaluation.durability.benign_steps=6",
            "evaluation.durability.benign_lr=1.0e-2",
            "evaluation.durability.trainability_seeds=[0,1]",
            "evaluation.durability.trainability_pairs=8",
            "evaluation.durability.finetune_batch_size=4",
        ],
    )
    s = durability_settings(cfg)
    warm = lora_finetune(
        model,
        tok,
        novel_task_pairs("train", 8),
        tmp_path / "warm",
        {**_ft(s), "steps": 24, "lr": 1e-2, "seed": 5, "save_adapter": False},
    )["model"]
    res = trainability_section({"original": model, "hardened": warm}, tok, [], s, tmp_path, lora_finetune, _data())
    o, h = res["original"], res["hardened"]
    assert res["task"].startswith("novel") and res["seeds"] == [0, 1] and len(o["curve"]) == 7
    for m in (o, h):  # the section's own steps at the configured threshold
        assert m["steps_to_loss"] == {
            sd: steps_to_loss(c, "task_loss", s.dur.trainability_loss) for sd, c in m["per_seed"].items()
        }
    start_o, start_h = o["curve"][0]["task_loss"], h["curve"][0]["task_loss"]
    assert start_h < start_o - 0.25  # the warm model knows the task (held-out words: it learned the rule, partly)
    # A loss just below where the warm model starts: it gets there by fine-tuning a little, the cold model has the
    # whole gap to cross in the same budget. Steps to that loss must rank the warm model first, on every seed.
    threshold = start_h - 0.05
    for sd in ("0", "1"):
        warm_steps = steps_to_loss(h["per_seed"][sd], "task_loss", threshold)
        cold_steps = steps_to_loss(o["per_seed"][sd], "task_loss", threshold)
        assert warm_steps is not None and warm_steps > 0, h["per_seed"][sd]
        assert cold_steps is None or cold_steps > warm_steps, (cold_steps, warm_steps)
        assert o["per_seed"][sd][-1]["task_loss"] < o["per_seed"][sd][0]["task_loss"]  # the cold model learns too


def _ft(s):
    from lat_lightning.eval.durability.finetune import finetune_settings

    return finetune_settings(s, steps=1, lr=1e-3, seed=0, save_adapter=False)


def _data():
    return DurabilityData(["p"], ["t"])
