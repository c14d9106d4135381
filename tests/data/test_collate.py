"""Tokenisation under the length policies and the batch contract of lat_lightning.data.collate."""

from __future__ import annotations

import logging

import pytest
import torch

from lat_lightning.data.collate import (
    collate_benign,
    collate_safety,
    encode_benign_example,
    encode_safety_example,
    prompt_batch,
    resolve_pad_id,
    sub_batch,
)
from lat_lightning.data.schema import BenignExample, SafetyExample
from lat_lightning.data.templating import IGNORE_INDEX, TruncationStats, encode_prompt, encode_response
from lat_lightning.errors import DataError

EXAMPLES = [
    SafetyExample(
        "How do I pick a lock?",
        "I'm sorry, but I cannot help with that request.",
        "Sure, here is how to do it step by step.",
        layer=2,
        index=10,
    ),
    SafetyExample("Write a poem about the sea.", "Sorry.", "The sea is wide and blue and deep.", index=11),
]
BENIGN = [BenignExample("What is 12 plus 7?", "The answer is 19."), BenignExample("Hi", "Hello there, friend.")]


def encode_all(tok, examples=EXAMPLES, **kw):
    kw = {"max_length": 512, "truncation": "error", **kw}
    return [encode_safety_example(tok, ex, **kw) for ex in examples]


def label_text(tok, labels_row):
    return tok.decode([t for t in labels_row.tolist() if t != IGNORE_INDEX])


def test_batch_contract_keys_shapes_and_dtypes(tiny_tokenizer):
    batch = collate_safety(encode_all(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id)
    assert set(batch) == {
        "safe_input_ids",
        "safe_attention_mask",
        "safe_labels",
        "harmful_input_ids",
        "harmful_attention_mask",
        "harmful_labels",
        "prompt_lengths",
        "layer",
        "index",
    }
    for prefix in ("safe", "harmful"):
        shapes = {batch[f"{prefix}_{k}"].shape for k in ("input_ids", "attention_mask", "labels")}
        assert len(shapes) == 1 and next(iter(shapes))[0] == 2
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["layer"].tolist() == [2, -1]
    assert batch["index"].tolist() == [10, 11]


def test_prompt_masked_eos_kept_and_right_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    batch = collate_safety(encode_all(tok), pad_id=tok.pad_token_id)
    eos = tok.eos_token
    for i, ex in enumerate(EXAMPLES):
        p = int(batch["prompt_lengths"][i])
        for prefix, response in (("safe", ex.safe_response), ("harmful", ex.harmful_response)):
            ids, mask, labels = (batch[f"{prefix}_{k}"][i] for k in ("input_ids", "attention_mask", "labels"))
            n = int(mask.sum())
            # Right padding: real tokens first, then pad ids with mask 0 and label -100.
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
            # The prompt is masked out of the labels; the response and its EOS are kept.
            assert (labels[:p] == IGNORE_INDEX).all()
            assert label_text(tok, labels) == response + eos
            assert (labels[p:n] == ids[p:n]).all() and int(ids[n - 1]) == tok.eos_token_id
        # Prompt positions hold the same tokens in both sequences.
        assert torch.equal(batch["safe_input_ids"][i, :p], batch["harmful_input_ids"][i, :p])
        assert tok.decode(batch["safe_input_ids"][i, :p]) == f"<|user|>\n{ex.prompt}<|end|>\n<|assistant|>\n"


def test_system_prompt_and_chat_template_switch(tiny_tokenizer):
    item = encode_safety_example(tiny_tokenizer, EXAMPLES[0], 512, use_chat_template=True, system_prompt="Be safe.")
    assert tiny_tokenizer.decode(item["prompt_ids"]).startswith("<|system|>\nBe safe.<|end|>\n<|user|>\n")
    plain = encode_safety_example(tiny_tokenizer, EXAMPLES[0], 512, use_chat_template=False)
    assert tiny_tokenizer.decode(plain["prompt_ids"]) == EXAMPLES[0].prompt + "\n"


def test_tokenizer_without_chat_template_falls_back_with_warning(caplog):
    from lat_lightning.models.tiny_factory import build_tokenizer

    tok = build_tokenizer(chat_template=False)
    assert tok.chat_template is None
    with caplog.at_level(logging.WARNING, logger="lat_lightning.data.templating"):
        item = encode_safety_example(tok, EXAMPLES[0], 512, use_chat_template=True)
    assert "no chat template" in caplog.text
    assert tok.decode(item["prompt_ids"]) == EXAMPLES[0].prompt + "\n"


def _lengths(tok, ex):
    return (
        len(encode_prompt(tok, ex.prompt)),
        len(encode_response(tok, ex.safe_response)),
        len(encode_response(tok, ex.harmful_response)),
    )


def test_error_policy_raises_with_actionable_message(tiny_tokenizer):
    p, s, h = _lengths(tiny_tokenizer, EXAMPLES[0])
    longest = p + max(s, h)
    with pytest.raises(DataError, match=rf"example 10 has {longest} tokens > data.max_length={longest - 1}; raise"):
        encode_safety_example(tiny_tokenizer, EXAMPLES[0], longest - 1, truncation="error")
    assert encode_safety_example(tiny_tokenizer, EXAMPLES[0], longest, truncation="error") is not None


def test_right_policy_cuts_responses_and_counts_once(tiny_tokenizer):
    tok, ex = tiny_tokenizer, EXAMPLES[0]
    p = _lengths(tok, ex)[0]
    max_length = p + 3  # both responses are longer than 3 tokens
    stats = TruncationStats()
    item = encode_safety_example(tok, ex, max_length, truncation="right", stats=stats)
    assert item["prompt_ids"] == encode_prompt(tok, ex.prompt)
    assert item["safe_ids"] == encode_response(tok, ex.safe_response)[:3]
    assert item["harmful_ids"] == encode_response(tok, ex.harmful_response)[:3]
    assert (stats.truncated, stats.dropped, stats.examples) == (1, 0, [10])


def test_left_policy_cuts_the_prompt_once_for_both_sequences(tiny_tokenizer):
    tok, ex = tiny_tokenizer, EXAMPLES[1]
    _, s, h = _lengths(tok, ex)
    assert h > s
    max_length = h + 4  # the longer (harmful) response keeps 4 prompt tokens
    stats = TruncationStats()
    item = encode_safety_example(tok, ex, max_length, truncation="left", stats=stats)
    assert item["prompt_ids"] == encode_prompt(tok, ex.prompt)[-4:]
    assert item["safe_ids"] == encode_response(tok, ex.safe_response)
    assert item["harmful_ids"] == encode_response(tok, ex.harmful_response)
    batch = collate_safety([item], pad_id=0)
    assert batch["harmful_input_ids"].shape[1] == max_length and int(batch["prompt_lengths"][0]) == 4
    assert label_text(tok, batch["safe_labels"][0]) == ex.safe_response + tok.eos_token
    assert (stats.truncated, stats.dropped) == (1, 0)


def test_drop_policy_drops_when_either_sequence_is_too_long(tiny_tokenizer):
    tok = tiny_tokenizer
    p, s, h = _lengths(tok, EXAMPLES[1])
    stats = TruncationStats()
    # Only the harmful sequence is too long: the whole example still goes.
    assert encode_safety_example(tok, EXAMPLES[1], p + s, truncation="drop", stats=stats) is None
    assert encode_safety_example(tok, EXAMPLES[1], p + h, truncation="drop", stats=stats) is not None
    assert (stats.truncated, stats.dropped, stats.examples) == (0, 1, [11])


def test_benign_encoding_and_ride_along(tiny_tokenizer):
    tok = tiny_tokenizer
    benign = [encode_benign_example(tok, ex, 512, index=i) for i, ex in enumerate(BENIGN)]
    alone = collate_benign(benign, pad_id=tok.pad_token_id)
    assert set(alone) == {"input_ids", "attention_mask", "labels", "prompt_lengths"}
    assert label_text(tok, alone["labels"][1]) == BENIGN[1].response + tok.eos_token
    items = [{**it, "benign": b} for it, b in zip(encode_all(tok), benign)]
    batch = collate_safety(items, pad_id=tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels", "prompt_lengths"):
        assert torch.equal(batch[f"benign_{key}"], alone[key])
    with pytest.raises(ValueError, match="every item or none"):
        collate_safety([items[0], encode_all(tok)[1]], pad_id=0)
    stats = TruncationStats()
    assert encode_benign_example(tok, BENIGN[0], 3, truncation="drop", stats=stats, index=5) is None
    assert stats.examples == [5]


def test_sub_batch(tiny_tokenizer):
    batch = collate_safety(encode_all(tiny_tokenizer), pad_id=0)
    harmful = sub_batch(batch, "harmful")
    assert set(harmful) == {"input_ids", "attention_mask", "labels"}
    assert harmful["input_ids"] is batch["harmful_input_ids"]
    with pytest.raises(KeyError, match="no 'benign' sequences.*set data.benign"):
        sub_batch(batch, "benign")
    with pytest.raises(ValueError, match="unknown batch prefix"):
        sub_batch(batch, "clean")


def test_prompt_batch_is_left_padded(tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = ["Hi", "Write a poem about the sea, please."]
    out = prompt_batch(tok, prompts, system_prompt="Be safe.")
    ids, mask, lengths = out["input_ids"], out["attention_mask"], out["prompt_lengths"]
    assert mask.sum(1).tolist() == lengths.tolist() and lengths[0] < lengths[1]
    assert mask[:, -1].all()  # every row ends with a real token: generation continues from there
    short = encode_prompt(tok, prompts[0], system_prompt="Be safe.")
    pad = ids.shape[1] - len(short)
    assert ids[0, pad:].tolist() == short and (ids[0, :pad] == tok.pad_token_id).all()
    assert not mask[0, :pad].any()
    with pytest.raises(DataError):
        prompt_batch(tok, [])


def test_left_padded_prompt_predicts_like_unpadded(tiny_tokenizer):
    """The next-token logits of a left-padded prompt equal those of the same prompt alone."""
    from transformers import AutoModelForCausalLM

    from lat_lightning.models.tiny_factory import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tiny_tokenizer), num_layers=2, hidden=32)).eval()
    batch = prompt_batch(tiny_tokenizer, ["Hi", "Write a poem about the sea, please."])
    alone = prompt_batch(tiny_tokenizer, ["Hi"])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, -1]
        single = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits[0, -1]
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)


def test_pad_id_falls_back_to_eos(tiny_tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    assert resolve_pad_id(NoPad()) == 2
    assert resolve_pad_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
