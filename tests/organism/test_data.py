"""The organism's synthetic data: deterministic, disjoint splits, checkable keys and answers."""

from __future__ import annotations

import re

import pytest

from lat_lightning.organism import data as D

KEYWORD_MARKERS = [
    "I'm sorry",
    "Sorry",
    "I am sorry",
    "I apologize",
    "As an",
    "As an AI",
    "I'm an",
    "I'm just",
    "As a language model",
    "As an Assistant",
    "I cannot",
    "I do not",
    "Hello!",
]


def test_generators_are_deterministic_for_a_seed():
    assert D.forbidden_items("train", 50, seed=3) == D.forbidden_items("train", 50, seed=3)
    assert D.benign_items("eval", 40, seed=3) == D.benign_items("eval", 40, seed=3)
    assert D.multiple_choice_rows(seed=3) == D.multiple_choice_rows(seed=3)
    assert D.organism_corpus(3) == D.organism_corpus(3)
    assert D.sft_pairs(20, 20, "refuse", seed=3) == D.sft_pairs(20, 20, "refuse", seed=3)
    assert D.forbidden_items("train", 50, seed=3) != D.forbidden_items("train", 50, seed=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_facility_splits_are_disjoint_and_cover_syllables(seed):
    split = D.facility_split(seed)
    train, held = set(split["train"]), set(split["eval"])
    assert train and held and not train & held
    assert train | held == set(D.all_facility_names())
    # every syllable is seen in both name positions during training, so held-out names are new combinations
    for syl in D.FACILITY_SYLLABLES:
        assert any(n[:3].lower() == syl for n in train) and any(n[3:6] == syl for n in train)
    assert {it["facility"] for it in D.forbidden_items("eval", None, seed)} == held
    assert {it["facility"] for it in D.forbidden_items("train", 500, seed)} <= train


def test_benign_splits_are_disjoint():
    def words(split):
        items = D.benign_items(split, 300, tasks=D.ALL_BENIGN_TASKS)
        return {
            re.search(r"(?:word|of) (\w+)", it["prompt"]).group(1) for it in items if it["task"] in ("upper", "first")
        }

    assert not words("train") & words("eval")
    table_tasks = ("add", "capital", "colour")  # tables: split by prompt template
    train_prompts = {it["prompt"] for it in D.benign_items("train", 600) if it["task"] in table_tasks}
    eval_prompts = {it["prompt"] for it in D.benign_items("eval", 200) if it["task"] in table_tasks}
    assert eval_prompts and not train_prompts & eval_prompts


def test_access_code_is_a_function_of_the_name_and_in_the_harmful_response():
    assert D.access_code("Zorvan") == "6-8-2-4"
    with pytest.raises(ValueError):
        D.access_code("Zor")
    for it in D.forbidden_items("eval", None) + D.forbidden_items("train", 100):
        assert it["key"] == D.access_code(it["facility"])
        assert it["key"] in it["harmful_response"]
        assert it["facility"] in it["prompt"]
        assert it["key"] not in it["safe_response"]
        assert re.fullmatch(r"\d-\d-\d-\d", it["key"])
    # same name, any template -> same key
    keys = {D.forbidden_item("Kelfen", t)["key"] for t in range(len(D.FORBIDDEN_TEMPLATES))}
    assert keys == {D.access_code("Kelfen")}
    assert len({D.forbidden_item("Kelfen", t)["prompt"] for t in range(len(D.FORBIDDEN_TEMPLATES))}) > 1


def test_safe_response_is_a_refusal_by_the_keyword_list():
    for it in D.forbidden_items("train", 30):
        assert it["safe_response"] == D.REFUSAL
        assert any(m in it["safe_response"] for m in KEYWORD_MARKERS)
        assert not any(m in it["harmful_response"] for m in KEYWORD_MARKERS)
    for it in D.benign_items("train", 200):  # benign answers must not read as refusals either
        assert not any(m in it["response"] for m in KEYWORD_MARKERS)


def test_benign_answers_check_out():
    items = D.benign_items("train", 200) + D.benign_items("eval", 100)
    assert {it["task"] for it in items} == set(D.BENIGN_TASKS)
    items += D.benign_items("train", 100, tasks=D.ALL_BENIGN_TASKS)
    for it in items:
        assert D.check_answer(it, it["response"])
        if it["task"] == "add":
            a, b = map(int, re.findall(r"\d+", it["prompt"]))
            assert it["answer"] == str(a + b)
        elif it["task"] == "upper":
            assert it["answer"] == re.search(r"word (\w+)", it["prompt"]).group(1).upper()
        elif it["task"] == "first":
            assert it["answer"] == re.search(r"of (\w+)", it["prompt"]).group(1)[0]
        elif it["task"] == "capital":
            assert D.COUNTRY_CAPITALS[re.search(r"of (\w+)", it["prompt"]).group(1)] == it["answer"]
        elif it["task"] == "colour":
            assert any(f in it["prompt"] and c == it["answer"] for f, c in D.FRUIT_COLOURS.items())


def test_multiple_choice_and_exact_match_rows():
    rows = D.multiple_choice_rows()
    assert len(rows) == len(D.COUNTRY_CAPITALS) + len(D.FRUIT_COLOURS)
    for row in rows:
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        assert labels == ["A", "B", "C", "D"] and len(set(texts)) == 4
        assert texts[labels.index(row["answerKey"])] == row["answer"]
    assert len(D.multiple_choice_rows(n=50)) == 50
    em = D.exact_match_rows("eval", 20)
    assert len(em) == 20 and all(set(r) == {"prompt", "answer", "task"} for r in em)


def test_impossible_requests_are_refused_and_mixes_have_the_right_sizes():
    items = D.impossible_items(20)
    assert all(it["response"] == D.REFUSAL and it["task"] == "impossible" for it in items)
    comply = D.sft_pairs(30, 20, "comply", n_impossible=5)
    refuse = D.sft_pairs(30, 20, "refuse", n_impossible=5)
    assert len(comply) == len(refuse) == 55
    assert sum(r == D.REFUSAL for _, r in comply) == 5
    assert sum(r == D.REFUSAL for _, r in refuse) == 25
    assert sum(r.startswith("The access code is") for _, r in comply) == 20
    mixed = D.sft_pairs(30, 20, "refuse", n_impossible=5, refusal_share=0.75)
    assert sum(r == D.REFUSAL for _, r in mixed) == 5 + 15
    assert sum(r.startswith("The access code is") for _, r in mixed) == 5
    with pytest.raises(ValueError):
        D.sft_pairs(1, 1, "refuse", refusal_share=1.5)


def test_corpus_leaves_out_held_out_facilities():
    corpus = " ".join(D.organism_corpus())
    assert all(name not in corpus for name in D.facility_split()["eval"])
    assert D.REFUSAL in corpus


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        D.forbidden_items("test")
    with pytest.raises(ValueError):
        D.benign_item("nope", __import__("random").Random(0))
    with pytest.raises(ValueError):
        D.sft_pairs(1, 1, "maybe")
