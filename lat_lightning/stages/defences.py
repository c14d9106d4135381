"""The defences the comparison trains (stage ``compare``, ``docs/defences.md``): name -> what it sets in a config.

Each defence is the run's own training (``trainer``, ``loss``, ``perturbation`` knobs, data) with the few keys
that make it that defence: its training attack and its safety loss weights (``toward_safe``, ``away_from_harmful``).
The utility loss (``loss.utility``, CE on ``data.benign``) is not a defence's: every defence trains with the
comparison's own weight (the recipe: 1.0), as the papers' LAT and ReFAT do. Everything else is shared, so that the
comparison differs in the defence only: the same starting model, data, optimiser budget, attacked layers (chosen
once for all) and utility tolerance of the weight interpolation. ``compare.overrides.<name>`` adjusts one defence
further.

=============  ==========================================================================================
``sft``        refusal SFT, no perturbation: the baseline every other defence must beat
``lapt``       LAPT (Gu et al. 2025): SFT toward the refusal under Eq. 1 Gaussian-normalised noise
``lat``        targeted LAT (Sheshadri et al. 2024): k-step PGD toward the harmful target as the inner loop;
               outer loss toward the refusal and away from the harmful target (weights .5 / .5)
``asagrad_at`` sign-gradient adversarial training: one Eq. 7 ASAgrad step as the attack, outer loss toward
               the refusal and away from the harmful target
``refat``      refusal-feature adversarial training (Yu et al. 2024): the refusal direction, recomputed from the
               current model every few micro-batches, ablated at every layer while training to refuse (needs
               ``data.benign``: the direction's harmless side)
``circuit_breakers``  representation rerouting (Zou et al. 2024): harmful representations pushed orthogonal to
               the frozen model's, retained ones kept (``loss.objective``, no training attack)
``repnoise``   RepNoise (Rosati et al. 2024): harmful MLP outputs pulled to Gaussian noise (MMD), damped
               logit-lens ascent on the harmful completion, refusal CE
``vaccine``    Vaccine (Huang et al. 2024): refusal CE under the worst-case attention-output perturbation of
               total norm rho
``booster``    Booster (Huang et al. 2024): refusal CE + penalty on a look-ahead harmful step's loss drop
=============  ==========================================================================================

The last four are defence objectives (:mod:`lat_lightning.training.objectives`): their own loss replaces the
attack + ``toward_safe`` / ``away_from_harmful`` terms; their knobs are ``loss.<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from lat_lightning.errors import ConfigError


@dataclass(frozen=True)
class Defence:
    """One defence: a description and the config keys it sets (nested dict, merged onto the run config)."""

    description: str
    settings: dict[str, Any] = field(default_factory=dict)
    needs_benign: bool = False  # trains on data.benign (utility loss or the harmless side of a direction)


def _objective(name: str) -> dict[str, Any]:
    """The keys of a defence objective: no training attack, its own loss (``lat_lightning.training.objectives``)."""
    return {"perturbation": {"attack": "none"}, "loss": {"objective": name, "away_from_harmful": 0.0}}


DEFENCES: dict[str, Defence] = {
    "sft": Defence(
        "refusal SFT, no perturbation (baseline)",
        {"perturbation": {"attack": "none"}, "loss": {"away_from_harmful": 0.0}},
    ),
    "lapt": Defence(
        "LAPT: refusal SFT under Eq. 1 noise",
        {"perturbation": {"attack": "asa_random"}, "loss": {"away_from_harmful": 0.0}},
    ),
    "lat": Defence(
        "targeted LAT: PGD inner loop, toward refusal / away from target",
        {"perturbation": {"attack": "pgd"}, "loss": {"toward_safe": 0.5, "away_from_harmful": 0.5}},
    ),
    "asagrad_at": Defence(
        "sign-gradient AT: one Eq. 7 step, toward refusal / away from target",
        {"perturbation": {"attack": "asagrad"}, "loss": {"toward_safe": 1.0, "away_from_harmful": 0.5}},
    ),
    "refat": Defence(
        "ReFAT: refusal direction ablated at every layer",
        {
            "perturbation": {"attack": "refusal_ablation", "positions": "all"},
            "loss": {"toward_safe": 1.0, "away_from_harmful": 0.0},
        },
        needs_benign=True,
    ),
    "circuit_breakers": Defence("circuit breakers: reroute harmful representations", _objective("circuit_breakers")),
    "repnoise": Defence("RepNoise: harmful representations to noise", _objective("repnoise")),
    "vaccine": Defence("Vaccine: refusal under attention-output perturbation", _objective("vaccine")),
    "booster": Defence("Booster: penalise a look-ahead harmful step", _objective("booster")),
}

# Sections a defence (and compare.overrides.<name>) may change; model, data, evaluation and the interpolation are
# shared by every defence, or the comparison would not compare defences.
OVERRIDABLE = ("perturbation", "loss", "trainer", "callbacks.kl_teacher")


def check_defence_name(name: str, key: str = "compare.defences") -> None:
    """Raises:
    ConfigError: ``name`` is not in :data:`DEFENCES`."""
    if name not in DEFENCES:
        import difflib

        close = difflib.get_close_matches(str(name), list(DEFENCES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown defence '{name}' in {key}; choose from {', '.join(DEFENCES)}{hint}")


def check_override_sections(name: str, override: Any) -> None:
    """``compare.overrides.<name>`` may only hold the :data:`OVERRIDABLE` sections.

    Raises:
        ConfigError: another section, or not a mapping.
    """
    key = f"compare.overrides.{name}"
    if not isinstance(override, dict):
        raise ConfigError(f"{key} must be a mapping of config sections, e.g. {{perturbation: {{steps: 4}}}}")
    for section, value in override.items():
        if section == "callbacks":
            extra = [k for k in (value or {}) if k != "kl_teacher"] if isinstance(value, dict) else ["?"]
            if not extra:
                continue
        elif section in OVERRIDABLE:
            continue
        raise ConfigError(
            f"{key}.{section} cannot differ between defences (the comparison shares it); a defence may "
            f"override only {', '.join(OVERRIDABLE)}"
        )


def _check_override_keys(node: DictConfig, override: dict, prefix: str) -> None:
    """Every key of ``override`` exists in the config ``node`` (a typo fails with the closest key)."""
    import difflib

    for key, value in override.items():
        if key not in node:
            valid = [str(k) for k in node.keys()]
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        child = node[key]
        if isinstance(value, dict) and OmegaConf.is_dict(child):
            _check_override_keys(child, value, f"{prefix}{key}.")


def defence_config(cfg: DictConfig, name: str, attack_layers: list | None = None) -> DictConfig:
    """The run config that trains defence ``name``: ``cfg`` + :data:`DEFENCES` ``[name]`` +
    ``compare.overrides[name]``, with the attacked layers fixed and the stages set to ``[fit]``.

    Args:
        cfg: the comparison's run config.
        name: a :data:`DEFENCES` key.
        attack_layers: the layers every defence attacks during training (chosen once for all); ``None`` keeps
            ``perturbation.layers`` / ``callbacks.fragile_layers`` as configured.

    Raises:
        ConfigError: an unknown defence, or an override outside :data:`OVERRIDABLE` or not in the schema.
    """
    check_defence_name(name)
    overrides = cast("dict[str, Any]", OmegaConf.to_container(cfg.compare.overrides, resolve=True) or {})
    own = overrides.get(name, {}) or {}
    check_override_sections(name, own)
    _check_override_keys(cfg, own, f"compare.overrides.{name}.")
    fixed: dict[str, Any] = {"stages": ["fit"]}
    if attack_layers is not None:
        fixed["perturbation"] = {"layers": list(attack_layers)}
        fixed["callbacks"] = {"fragile_layers": {"enabled": False}}
    try:
        out = OmegaConf.merge(cfg, DEFENCES[name].settings, own, fixed)
    except Exception as exc:  # noqa: BLE001 - omegaconf: unknown key or wrong type in the override
        first = (str(getattr(exc, "msg", None) or exc).splitlines() or ["?"])[0]
        raise ConfigError(f"compare.overrides.{name}: {first}") from None
    return cast(DictConfig, out)  # cfg is a DictConfig, so is what it merges into


__all__ = ["DEFENCES", "OVERRIDABLE", "Defence", "check_defence_name", "check_override_sections", "defence_config"]
