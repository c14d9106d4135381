"""benchmarks.defence_cost: one interleaved step per defence, timed, as a ratio to SFT of the same round."""

from __future__ import annotations

import json

from benchmarks.defence_cost import main


def test_reports_every_defence_against_sft(capsys):
    main(["--repeats", "1", "--defences", "vaccine,booster"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("RESULT ")
    result = json.loads(line[len("RESULT ") :])
    assert list(result["x_sft"]) == ["sft", "vaccine", "booster"]  # sft added as the baseline
    assert result["x_sft"]["sft"] == 1.0
    assert all(v > 0 for v in result["seconds_per_step"].values())
    assert result["repeats"] == 1
