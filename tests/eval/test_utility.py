"""Utility scoring: row normalisation, number extraction, MC log-likelihood accuracy, exact match."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lat_lightning.data.templating import encode_prompt, encode_response
from lat_lightning.errors import ConfigError, DataError
from lat_lightning.eval import utility
from lat_lightning.eval.utility import (
    evaluate_utility,
    extract_number,
    generate_greedy,
    load_utility_rows,
    normalise_utility_row,
    score_continuations,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads spin badly when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("so #### 1,234 and later 7 more", "1234"),
        ("It costs $18.00 in total", "18"),
        ("-3.50 degrees", "-3.5"),
        ("pairs 3,4", "4"),
        ("1,000,000 people", "1000000"),
        ("#### -0", "0"),
        ("#### none\nbut 12 then", "12"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_normalise_multiple_choice_formats():
    csqa = {"question": "Where?", "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]}, "answerKey": "C"}
    assert normalise_utility_row(csqa, "multiple_choice") == {
        "question": "Where?",
        "choices": ["x", "y", "z"],
        "labels": ["A", "B", "C"],
        "answer_index": 2,
    }
    arc = {"question": "Q", "choices": {"label": ["1", "2", "3", "4"], "text": list("abcd")}, "answerKey": "2"}
    assert normalise_utility_row(arc, "multiple_choice")["answer_index"] == 1
    mmlu = {"question": "Q", "choices": ["a", "b", "c"], "answer": 0}
    assert normalise_utility_row(mmlu, "multiple_choice")["answer_index"] == 0
    letter = {"question": "Q", "choices": ["a", "b"], "answer": "b"}
    assert normalise_utility_row(letter, "multiple_choice")["answer_index"] == 1
    legacy = {
        "question": {"stem": "Q", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}]},
        "answerKey": "B",
    }
    row = normalise_utility_row(legacy, "multiple_choice")
    assert row["question"] == "Q" and row["answer_index"] == 1
    assert normalise_utility_row(row, "multiple_choice") == row  # idempotent
    for bad in (
        {"question": "Q", "choices": ["a", "b"], "answer": "Z"},
        {"question": "Q", "choices": ["a"], "answer": 0},
        {"choices": ["a", "b"], "answer": 0},
    ):
        with pytest.raises(DataError):
            normalise_utility_row(bad, "multiple_choice")
    with pytest.raises(ConfigError):
        normalise_utility_row(mmlu, "organism")


def test_normalise_exact_match():
    row = normalise_utility_row({"question": "2+2?", "answer": "Add them.\n#### 4"}, "exact_match")
    assert row == {"question": "2+2?", "answer": "Add them.\n#### 4", "gold": "4"}
    assert normalise_utility_row({"question": "q", "answer": 7}, "exact_match")["gold"] == "7"
    with pytest.raises(DataError, match="final number"):
        normalise_utility_row({"question": "q", "answer": "none"}, "exact_match")


def test_load_utility_rows_from_files(tmp_path):
    jl = tmp_path / "mc.jsonl"
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answerKey": "A"} for i in range(5)]
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_utility_rows(str(jl), "multiple_choice", max_rows=3)
    assert len(loaded) == 3 and loaded[2]["question"] == "q2" and loaded[0]["answer_index"] == 0
    csv_path = tmp_path / "mc.csv"
    csv_path.write_text('question,choices,answerKey\nWhy?,"[""x"", ""y"", ""z""]",C\n')
    assert load_utility_rows(str(csv_path))[0]["answer_index"] == 2
    gsm = tmp_path / "gsm.json"
    gsm.write_text(json.dumps([{"question": "q", "answer": "x\n#### 1,200"}]))
    assert load_utility_rows(str(gsm), "exact_match")[0]["gold"] == "1200"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answerKey": "Q"}))
    with pytest.raises(DataError, match="row 0"):
        load_utility_rows(str(bad))
    with pytest.raises(DataError):
        load_utility_rows(str(tmp_path / "missing.jsonl"))


MC_ROWS = [
    {"question": "How do I bake bread at home?", "choices": ["Mix flour and water.", "The sea is blue.", "19"]},
    {"question": "What is 12 plus 7?", "choices": ["The answer is 19.", "sugar", "I'm sorry"]},
    {"question": "Write a poem about the sea.", "choices": ["The sea is wide and deep.", "12", "oxygen and light"]},
    {"question": "Explain photosynthesis.", "choices": ["Plants turn light into sugar.", "fox", "dog"]},
]


def _manual_choice_scores(model, tokenizer, question, choices):
    """Sum of log p(choice token | prefix), one unpadded forward per choice."""
    prompt = encode_prompt(tokenizer, question, True)
    scores = []
    for c in choices:
        ids = encode_response(tokenizer, c, add_eos=False)
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
        scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
    return scores


def test_multiple_choice_accuracy_matches_direct_computation(tiny_llama):
    model, tok = tiny_llama
    manual = [_manual_choice_scores(model, tok, r["question"], r["choices"]) for r in MC_ROWS]
    preds = [max(range(3), key=s.__getitem__) for s in manual]
    # Rows 0-2 keyed to the model's own preference, row 3 to another choice: accuracy must be 3/4.
    rows = [dict(r, answerKey="ABC"[p]) for r, p in zip(MC_ROWS, preds)]
    rows[3]["answerKey"] = "ABC"[(preds[3] + 1) % 3]
    model.train()
    model.model.layers[0].eval()  # a submodule in its own mode must be restored as it was
    before = [p.detach().clone() for p in model.parameters()]
    out = evaluate_utility(model, tok, rows, "multiple_choice", batch_size=2)
    assert out == {"accuracy": 0.75, "n": 4, "failures": 0, "correct": 3}
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # Batched, right-padded scoring equals the unpadded per-choice computation.
    prompt = encode_prompt(tok, MC_ROWS[2]["question"], True)
    conts = [encode_response(tok, c, add_eos=False) for c in MC_ROWS[2]["choices"]]
    model.eval()
    got = score_continuations(model, tok, [prompt] * 3, conts, batch_size=3)
    assert got == pytest.approx(manual[2], abs=1e-4)


def test_multiple_choice_failures_are_counted(tiny_llama):
    model, tok = tiny_llama
    rows = [dict(MC_ROWS[0], answer=0), {"question": "broken", "choices": ["a", "b"], "answer": "Z"}]
    out = evaluate_utility(model, tok, rows, "multiple_choice", max_length=4096)
    assert out["n"] == 2 and out["failures"] == 1 and out["accuracy"] in (0.0, 1.0)
    too_long = evaluate_utility(model, tok, rows[:1], "multiple_choice", max_length=3)
    assert too_long["failures"] == 1 and math.isnan(too_long["accuracy"])
    with pytest.raises(ConfigError):
        evaluate_utility(model, tok, rows, "organism")


def test_exact_match_scoring(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    seen = {}

    def fake_generate(m, t, prompts, max_new_tokens, batch_size):
        seen.update(n=len(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
        return ["It is 72.", "#### 5 and then 6", "I do not know", "1,200 apples"]

    monkeypatch.setattr(utility, "generate_greedy", fake_generate)
    rows = [
        {"question": "a", "answer": "#### 72"},
        {"question": "b", "answer": "#### 5"},
        {"question": "c", "answer": "#### 3"},
        {"question": "d", "answer": "... #### 1,200"},
        {"question": "e", "answer": "no number"},
    ]
    out = evaluate_utility(model, tok, rows, "exact_match", batch_size=3, max_new_tokens=17)
    assert out == {"accuracy": 0.75, "n": 5, "failures": 1, "correct": 3}
    assert seen == {"n": 4, "max_new_tokens": 17, "batch_size": 3}


def test_normalise_contains():
    assert normalise_utility_row({"prompt": "3 plus 5?", "answer": "8", "task": "add"}, "contains") == {
        "prompt": "3 plus 5?",
        "answer": "8",
    }
    assert normalise_utility_row({"question": "q", "answer": 7}, "contains") == {"prompt": "q", "answer": "7"}
    for bad in ({"prompt": "q"}, {"prompt": "", "answer": "a"}, {"answer": "a"}, {"prompt": "q", "answer": ""}):
        with pytest.raises(DataError):
            normalise_utility_row(bad, "contains")


def test_contains_scoring(tiny_llama, monkeypatch):
    """Greedy answers (generate_under_attack, 16 new tokens unless told) that contain the row's answer."""
    from types import SimpleNamespace

    from lat_lightning.eval import generation

    model, tok = tiny_llama
    seen = {}

    def fake_generate(m, t, prompts, **kwargs):
        seen.update(prompts=list(prompts), **kwargs)
        return SimpleNamespace(texts=["3 plus 5 is 8.", "Paris, of course", "no idea"])

    monkeypatch.setattr(generation, "generate_under_attack", fake_generate)
    rows = [
        {"prompt": "3 plus 5?", "answer": "8"},
        {"prompt": "Capital of France?", "answer": "Paris"},
        {"prompt": "Colour of the sky?", "answer": "blue"},
        {"prompt": "broken"},
    ]
    out = evaluate_utility(model, tok, rows, "contains", batch_size=64)
    assert out == {"accuracy": 2 / 3, "n": 4, "failures": 1, "correct": 2}
    assert seen == {
        "prompts": ["3 plus 5?", "Capital of France?", "Colour of the sky?"],
        "settings": generation.GenerationSettings(
            max_new_tokens=16, batch_size=64, use_chat_template=True, system_prompt=None
        ),
    }
    evaluate_utility(model, tok, rows[:3], "contains", max_new_tokens=5)
    assert seen["settings"].max_new_tokens == 5


def test_contains_rows_load_from_a_file(tmp_path):
    path = tmp_path / "em.jsonl"
    path.write_text('{"prompt": "3 plus 5?", "answer": "8", "task": "add"}\n{"prompt": "hi", "answer": "hello"}\n')
    assert load_utility_rows(str(path), "contains") == [
        {"prompt": "3 plus 5?", "answer": "8"},
        {"prompt": "hi", "answer": "hello"},
    ]
    with pytest.raises(DataError, match="row 1"):
        path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "no answer"}\n')
        load_utility_rows(str(path), "contains")


def test_greedy_generation_batched_equals_single(tiny_llama):
    model, tok = tiny_llama
    prompts = [encode_prompt(tok, q, True) for q in ["What is 12 plus 7?", "hi", "Explain photosynthesis to me now"]]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and len(batched) == 3
    ids = [torch.tensor([p]) for p in prompts]
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids[1],
            attention_mask=torch.ones_like(ids[1]),
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=tok.pad_token_id,
        )
    assert batched[1] == tok.decode(ref[0, ids[1].shape[1] :], skip_special_tokens=True)


def test_a_prompt_template_without_the_question_raises_a_value_error_naming_the_field():
    from lat_lightning.eval.utility import UtilityScoring

    with pytest.raises(ValueError, match="^prompt_template must contain"):
        UtilityScoring(prompt_template="Answer with a number.")
