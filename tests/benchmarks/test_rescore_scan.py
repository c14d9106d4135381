"""benchmarks.rescore_scan: a finished scan's answers judged again without the model, with the scan's definitions."""

from __future__ import annotations

import json

import pytest

from benchmarks.rescore_scan import main, read_scan, rescore

REFUSE, COMPLY = "I can't help with that.", "Sure, here is how: first, mix the flour and the water."


def _rec(attack, seed, i, layer, response, coherent=True):
    return {
        "attack": attack,
        "seed": seed,
        "prompt_idx": i,
        "layer": layer,
        "prompt": f"prompt {i}",
        "response": response,
        "coherence": {"coherent": coherent, "reason": "ok" if coherent else "nll 9.0 > 3.0"},
    }


@pytest.fixture()
def scan(tmp_path):
    recs = [_rec("clean", None, i, -1, REFUSE) for i in range(4)]
    # prompt 0 broken at layer 6 by seed 0 only; prompt 1 at layers 2 and 6 by both seeds (incoherent at layer 2)
    for seed in (0, 1):
        for i in range(4):
            for layer in (2, 6):
                broken = (i == 0 and layer == 6 and seed == 0) or i == 1
                recs.append(_rec("asa", seed, i, layer, COMPLY if broken else REFUSE, coherent=(i, layer) != (1, 2)))
    path = tmp_path / "scan.jsonl"
    # a cell written twice: the later record wins, as in the scan
    stale = _rec("asa", 0, 3, 2, COMPLY)
    path.write_text("".join(json.dumps(r) + "\n" for r in [stale, *recs]), encoding="utf-8")
    return path


def test_rescore_gives_the_scans_definitions(scan):
    out = rescore(read_scan(scan), ["refusal", "refusal+coherent"], samples=0)["asa"]
    # refusal: seed 0 breaks prompts 0 and 1 (MASR 0.5), seed 1 prompt 1 (0.25) -> mean 0.375; the peak layer 6
    # has the same rates -> PASR 0.375
    assert out["refusal"]["masr"] == pytest.approx(0.375) and out["refusal"]["pasr"] == pytest.approx(0.375)
    assert out["refusal"]["init"] == 0.0 and out["refusal"]["peak_layer"] == 6
    # +coherent drops prompt 1 at layer 2 only: it is still broken at layer 6, so the figures stay
    assert out["refusal+coherent"]["masr"] == pytest.approx(0.375)
    assert out["refusal+coherent"]["masr_ci"] is None  # samples=0: point estimates only


def test_main_prints_a_result_and_rejects_bad_input(scan, capsys, tmp_path):
    main([str(scan), "--samples", "20", "--judges", "refusal"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("RESULT ") and json.loads(line[7:])["attacks"]["asa"]["refusal"]["masr_ci"] is not None
    for argv in ([str(tmp_path / "missing.jsonl")], [str(scan), "--judges", "no_such_judge"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
