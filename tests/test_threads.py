"""The CPU thread policy: passive OpenMP waiting by default, threads from the cores free, overrides in order."""

from __future__ import annotations

import pytest

from lat_lightning import threads
from lat_lightning.errors import ConfigError


def test_wait_policy_is_a_default_the_environment_can_override():
    env = {}
    threads.set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.set_wait_policy(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_thread_count_overrides_in_order(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0.2: 1.4)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.choose_threads({}) == (1, "1.4 of 2 cores free")
    assert threads.choose_threads({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS=3")
    assert threads.choose_threads({"OMP_NUM_THREADS": "3", "LAT_LIGHTNING_THREADS": "2"})[0] == 2
    assert threads.choose_threads({"OMP_NUM_THREADS": "3", "LAT_LIGHTNING_THREADS": "auto"})[0] == 1
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0.2: 0.2)
    assert threads.choose_threads({})[0] == 1  # a fully busy machine still gets one thread
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="LAT_LIGHTNING_THREADS"):
            threads.choose_threads({"LAT_LIGHTNING_THREADS": bad})


def test_free_cores_is_measured_within_the_usable_cores():
    free = threads.free_cores(sample_s=0.05)
    assert 0.0 <= free <= threads.usable_cores()


def test_a_narrow_model_gets_one_thread_unless_overridden(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0.2: 2.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.choose_threads({})[0] == 2
    assert threads.choose_threads({}, model_width=threads.SMALL_MODEL_WIDTH + 1)[0] == 2
    n, why = threads.choose_threads({}, model_width=128)  # the organism
    assert n == 1 and "128 wide" in why
    assert threads.choose_threads({"LAT_LIGHTNING_THREADS": "2"}, model_width=128)[0] == 2  # the override wins
    assert threads.choose_threads({"OMP_NUM_THREADS": "2"}, model_width=128)[0] == 2


def test_the_pipeline_runs_the_organisms_stages_on_one_thread(tmp_path, monkeypatch, capsys):
    """The width comes from the model's config (no model is loaded for it)."""
    import torch

    from lat_lightning.cli import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LAT_LIGHTNING_THREADS", raising=False)
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=0.2: 2.0)
    seen = []
    monkeypatch.setattr("lat_lightning.stages.fit.run", lambda cfg, run_dir: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "--recipe",
                    "lapt_tiny",
                    f"logging.root_dir={tmp_path}",
                    "callbacks.fragile_layers.enabled=false",
                    "perturbation.layers=[1]",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(before)
    assert seen == [1]  # tiny:llama is 64 wide
