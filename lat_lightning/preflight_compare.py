"""Preflight checks of the ``compare`` stage's own section (called by :func:`lat_lightning.preflight.check_config`):
the defence names and their overrides, the embedding and pre-fill attacks and the targets they need. The defences'
training settings are checked by the preflight itself (with the training checks it shares with ``fit``).
"""

from __future__ import annotations

from lat_lightning.errors import ConfigError
from lat_lightning.preflight_sources import config_value


def check_compare_defences(cfg, names: list[str]) -> None:
    """``compare.defences``: something to compare, known names listed once, overrides only for listed ones."""
    from lat_lightning.stages.defences import check_defence_name

    if not names and not cfg.compare.include_original:
        raise ConfigError(
            "compare.defences is empty and compare.include_original=false: nothing to compare; list "
            "defences, e.g. compare.defences=[sft,lapt]"
        )
    for name in names:
        check_defence_name(name)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"defence '{dup}' is listed twice in compare.defences")
    for name in config_value(cfg, "compare.overrides") or {}:
        if name not in names:
            raise ConfigError(
                f"compare.overrides.{name}: '{name}' is not in compare.defences [{', '.join(names)}]; add it "
                "there or fix the name"
            )


def check_compare_attacks(cfg) -> None:
    """The comparison's attacks: embedding-space attack names, pre-fill lengths, and the harmful targets the
    fine-tuning and pre-fill attacks need."""
    from lat_lightning.attacks import check_attack_name

    cmp = cfg.compare
    for a in cmp.embed_attacks:
        try:
            check_attack_name(str(a), "compare.embed_attacks", scan=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for k in cmp.prefill_tokens:
        if isinstance(k, bool) or int(k) < 1:
            raise ConfigError(
                f"compare.prefill_tokens holds {k}; each must be >= 1 (pre-filled target tokens), "
                "or [] for no pre-fill column"
            )
    if (cmp.finetune or cmp.prefill_tokens) and not cfg.data.harmful and not cfg.data.eval_harmful:
        raise ConfigError("the fine-tuning and pre-fill attacks need harmful targets: set data.eval_harmful")


__all__ = ["check_compare_attacks", "check_compare_defences"]
