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
