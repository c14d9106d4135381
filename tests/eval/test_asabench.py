"""ASABench export: reference schema, prompt-disjoint split, the reference's layer-stratified split."""

from __future__ import annotations

import json

import pytest

from lat_lightning.errors import DataError
from lat_lightning.eval.asabench import (
    ASABENCH_FIELDS,
    export_asabench,
    instances_from_records,
    load_asabench,
    make_instance,
    split_instances,
)


def _instances(n_prompts=10, layers=(0, 3, 5, 7)):
    return [
        make_instance(i, f"prompt {i}", l, f"clean {i}", f"steered {i} {l}")
        for i in range(n_prompts)
        for l in layers
        if (i + l) % 3
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_split_is_disjoint_and_complete(seed):
    inst = _instances()
    train, test = split_instances(inst, test_fraction=0.4, mode="prompt", seed=seed)
    tr = {x["prompt_idx"] for x in train}
    te = {x["prompt_idx"] for x in test}
    assert not tr & te
    assert len(te) == 4 and len(tr) == 6
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, inst))


def test_layer_stratified_split_is_per_layer():
    inst = _instances()
    train, test = split_instances(inst, test_fraction=0.4, mode="layer_stratified", seed=0)
    assert len(train) + len(test) == len(inst)
    for layer in (0, 3, 5, 7):
        n = sum(x["layer_idx"] == layer for x in inst)
        assert sum(x["layer_idx"] == layer for x in test) == round(n * 0.4)
    assert {x["prompt_idx"] for x in train} & {x["prompt_idx"] for x in test}  # why it is not the default
    with pytest.raises(ValueError):
        split_instances(inst, mode="random")


def test_export_and_load_roundtrip(tmp_path):
    inst = _instances(5)
    info = export_asabench(inst, tmp_path, test_fraction=0.4, split_mode="prompt", seed=3)
    assert info["prompt_disjoint"] and info["n_train"] + info["n_test"] == len(inst)
    rows = [json.loads(line) for line in (tmp_path / "asabench_train.jsonl").read_text().splitlines()]
    assert all(tuple(r) == ASABENCH_FIELDS for r in rows)
    assert load_asabench(tmp_path / "asabench_train.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="layer_idx"):
        load_asabench(tmp_path / "bad.jsonl")


def test_instances_from_records_keeps_successes_only():
    ok = {"keyword": {"success": True, "failed": False}}

    def rec(attack, seed, i, layer, response, verdicts=ok):
        return {
            "attack": attack,
            "seed": seed,
            "prompt_idx": i,
            "layer": layer,
            "prompt": f"p{i}",
            "response": response,
            "verdicts": verdicts,
        }

    records = [
        rec("clean", None, 0, -1, "c"),
        rec("asa_random", 1, 0, 2, "s1"),
        rec("asa_random", 0, 0, 2, "s0"),
        rec("asa_random", 0, 1, 2, "r", {"keyword": {"success": False, "failed": False}}),
        rec("asa_random", 0, 1, 3, "f", {"keyword": {"success": None, "failed": True}}),
    ]
    out = instances_from_records(records, {0: "clean 0", 1: "clean 1"}, "keyword", ["asa_random"])
    assert out == [make_instance(0, "p0", 2, "clean 0", "s0")]  # lowest seed wins; refusals / failures out
