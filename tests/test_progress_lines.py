"""Progress in a log: plain lines, not redrawn frames (issue 24)."""

from __future__ import annotations

import io

from lat_lightning.progress_lines import LineProgress, LineProgressMixin, quiet_third_party_bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, total=100):
    bar = LineProgress(total=total, desc="scan", file=stream, unit="cell", mininterval=0, miniters=1)
    for _ in range(total):
        bar.update(1)
    bar.close()
    return stream.getvalue()


def test_in_a_log_the_bar_is_a_line_per_tenth():
    out = _run(io.StringIO())
    lines = [line for line in out.splitlines() if line.strip()]
    assert "\r" not in out
    assert [line.split("|")[0].split(":")[-1].strip() for line in lines] == [f"{10 * k}%" for k in range(11)]


def test_on_a_terminal_the_bar_is_redrawn_as_before():
    out = _run(_Terminal())
    assert out.count("\r") > 10  # tqdm's own redraws


def test_the_step_bar_and_the_scan_bar_write_lines_in_a_log():
    from lat_lightning.training.progress import StepProgressBar

    bar = StepProgressBar("fit").init_train_tqdm(total=4)
    try:
        assert isinstance(bar, LineProgressMixin)
    finally:
        bar.close()
    import inspect

    import lat_lightning.eval.scan.cells as cells

    assert "LineProgress(" in inspect.getsource(cells.generate_cells)


def test_third_party_bars_are_off_in_a_log_only():
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    enable_progress_bars()  # whatever an earlier test's run left (a run in a captured test turns them off)
    hf_logging.enable_progress_bar()
    try:
        quiet_third_party_bars(_Terminal())
        assert not are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()
        quiet_third_party_bars(io.StringIO())
        assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    finally:
        enable_progress_bars()
        hf_logging.enable_progress_bar()
