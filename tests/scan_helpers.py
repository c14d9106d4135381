"""Tests' shorthand for :func:`lat_lightning.eval.scan.run_scan`: the settings objects built from keyword arguments.

The tests name only what they vary (``max_new_tokens=5``, ``best_of_n=3``, ``resume=False``...); :func:`scan`
files each keyword under the settings object that owns it, so an unknown keyword is an error, not ignored.
"""

from __future__ import annotations

import dataclasses

from lat_lightning.eval.generation import GenerationSettings
from lat_lightning.eval.scan import JudgeSettings, ScanOptions, ScanPrompts, ScanSettings, run_scan


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def scan_settings(**keywords) -> ScanSettings:
    """A :class:`ScanSettings` from the fields of it and of its generation and judge settings."""
    generation = {k: keywords.pop(k) for k in list(keywords) if k in _names(GenerationSettings)}
    judging = {k: keywords.pop(k) for k in list(keywords) if k in _names(JudgeSettings)}
    unknown = set(keywords) - _names(ScanSettings)
    if unknown:
        raise TypeError(f"not a scan setting: {sorted(unknown)}")
    return ScanSettings(generation=GenerationSettings(**generation), judging=JudgeSettings(**judging), **keywords)


def scan(
    model,
    tokenizer,
    prompts,
    targets=None,
    layers=None,
    attacks=("asa_random",),
    seeds=(0,),
    judges=("keyword",),
    out_dir=None,
    **keywords,
):
    """:func:`run_scan` with the settings, data and options given as keywords (the old call's shape)."""
    data = {k: keywords.pop(k) for k in list(keywords) if k in _names(ScanPrompts)}
    options = {k: keywords.pop(k) for k in list(keywords) if k in _names(ScanOptions)}
    settings = scan_settings(layers=layers, attacks=attacks, seeds=seeds, judges=judges, **keywords)
    return run_scan(model, tokenizer, ScanPrompts(prompts, targets, **data), settings, out_dir, ScanOptions(**options))
