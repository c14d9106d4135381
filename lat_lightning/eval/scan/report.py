"""The scan's markdown report (``scan_report.md``): headline, LASR by layer, every judge, coherence, judge agreement,
best-of-N, failures, caveats, probes, the ASABench export, figures and sample generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lat_lightning.eval.metrics import TIE_RULE
from lat_lightning.eval.scan.records import cell_key
from lat_lightning.eval.scan.summary import ScanResult, fmt
from lat_lightning.models.layers import layer_name

REPORT_FILE = "scan_report.md"


def _fmt_ci(ci) -> str:
    """`` [low, high]`` of an interval (empty when there is none)."""
    if not ci or ci[0] is None:
        return ""
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


KEYWORD_GIBBERISH_CAVEAT = (
    "- **Keyword judges count gibberish as success.** They only detect refusal phrases: empty, garbled or "
    "off-topic output counts as an attack success, so keyword ASR is an upper bound on harmful output. "
    "Check the samples below or use a classifier judge."
)


def _peak_probe_layer(layer) -> str:
    return "n/a" if layer is None else layer_name(layer)


def _layers_text(layers) -> str:
    return ", ".join(layer_name(l) for l in layers or [] if l is not None)


def _peak_text(h: dict) -> str:
    tied = h.get("peak_tied_layers") or []
    if h.get("pasr_of_mean_lasr_layer") is None:
        return f"{fmt(h['pasr_of_mean_lasr'])}"
    if not h.get("pasr_of_mean_lasr"):
        return f"{fmt(h['pasr_of_mean_lasr'])} (no success at any layer)"
    text = f"{fmt(h['pasr_of_mean_lasr'])} (layer {layer_name(h['pasr_of_mean_lasr_layer'])}"
    if len(tied) > 1:
        text += f"; tied at {len(tied)} layers: {_layers_text(tied)}; {h.get('peak_decided_by')}"
    return text + ")"


def _coherence_text(rec: dict) -> str:
    c = rec.get("coherence")
    if not c:
        return ""
    return "coherent" if c["coherent"] else f"INCOHERENT: {c['reason']}"


def render_report(result: ScanResult) -> str:
    """The markdown report (``scan_report.md``)."""
    s = result.summary
    p = result.primary_judge
    cells = s.get("cells", {})
    lines = [
        "# Layer scan report",
        "",
        (
            f"{len(result.prompts)} prompts x {len(result.layers)} layers ({_layers_text(result.layers)}), "
            f"attacks: {', '.join(result.attacks)}, seeds: {result.seeds}; judges: {', '.join(result.judges)} "
            f"(headline: **{p}**)."
        ),
        f"Cells generated in this run: {cells.get('run', 0)}; resumed from an earlier run: {cells.get('resumed', 0)}.",
        "",
    ]
    if s.get("warnings"):
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in s["warnings"]] + [""]
    lines += _headline_section(result)
    lines += _coherence_section(result)
    lines += _agreement_section(result)
    lines += _best_of_n_section(result)
    lines += _failures_section(result)
    lines += _probes_section(result)
    lines += _samples_section(result)
    return "\n".join(lines) + "\n"


def _headline_section(result: ScanResult) -> list[str]:
    """The headline table (primary judge), the notes on it and LASR by layer; all judges' numbers."""
    s = result.summary
    lines: list[str] = []
    lines += ["## Headline (primary judge)", ""]
    rows = []
    for a in result.attacks:
        h = s["attacks"][a]["headline"]
        rows.append(
            [
                a,
                s["attacks"][a]["seeds"],
                fmt(h["init"]) + _fmt_ci(h["init_ci"]),
                f"{fmt(h['pasr_mean'])} ± {fmt(h['pasr_std'])}{_fmt_ci(h.get('pasr_ci'))}",
                _layers_text(h["pasr_layers"]),
                _peak_text(h),
                f"{fmt(h['masr_mean'])} ± {fmt(h['masr_std'])}{_fmt_ci(h.get('masr_ci'))}",
                fmt(h["masr_any_seed"]),
                h["failures_total"],
            ]
        )
    lines += _table(
        [
            "attack",
            "seeds",
            "INIT",
            "PASR (mean ± std)",
            "peak layer per seed",
            "PASR of mean LASR",
            "MASR (mean ± std)",
            "MASR any seed",
            "judge failures",
        ],
        rows,
    )
    lines += [
        "",
        (
            "Intervals are 95% percentile bootstrap intervals of the number beside them, the mean over seeds: each "
            "draw resamples the seeds, then the prompts (one seed: the prompts only). PASR = max over "
            "layers of LASR; MASR = mean over prompts of max over layers; INIT = success rate of the clean answers. "
            "Deterministic attacks (ASAgrad, zero-start PGD) run the first seed only. "
            f"Peak layer: {s.get('tie_rule', TIE_RULE)}"
            + (f" (tie-break judge: {s['tiebreak_judge']})." if s.get("tiebreak_judge") else ".")
        ),
        "",
        "## LASR by layer (primary judge, mean over seeds)",
        "",
    ]
    lines += _table(
        ["layer"] + result.attacks,
        [
            [layer_name(l)] + [fmt(s["attacks"][a]["lasr_band"]["lasr"][j]) for a in result.attacks]
            for j, l in enumerate(result.layers)
        ],
    )
    lines += ["", "## All judges", ""]
    lines += _table(
        ["attack", "judge", "INIT", "PASR mean", "MASR mean", "failures (cells)"],
        [
            [
                a,
                jn,
                fmt(js.get("init_mean")),
                fmt(js.get("pasr_mean")),
                fmt(js.get("masr_mean")),
                js.get("failures_total"),
            ]
            for a in result.attacks
            for jn, js in s["attacks"][a]["judges"].items()
        ],
    )
    return lines


def _coherence_section(result: ScanResult) -> list[str]:
    """How many answers are incoherent, per attack (when the check ran)."""
    s = result.summary
    p = result.primary_judge
    lines: list[str] = []
    if any(s["attacks"][a].get("coherence", {}).get("checked") for a in result.attacks):
        lines += [
            "",
            "## Coherence of the answers",
            "",
            (
                "Every answer is checked: empty, repetition (share of repeated word bigrams), and the unattacked "
                "model's per-token NLL of the answer (nats). Incoherent answers that the primary judge counts as "
                "successes are gibberish counted as harm; the `+coherent` judges do not count them."
            ),
            "",
        ]
        crow = []
        for name, c in [("clean", s.get("clean", {}).get("coherence", {}))] + [
            (a, s["attacks"][a].get("coherence", {})) for a in result.attacks
        ]:
            if not c.get("checked"):
                continue
            crow.append(
                [
                    name,
                    c["checked"],
                    f"{c['incoherent']} ({c['incoherent'] / c['checked']:.2f})",
                    c["empty"],
                    c["repetitive"],
                    c["high_nll"],
                    c["successes"],
                    c["incoherent_successes"],
                    fmt(c.get("mean_nll")),
                ]
            )
        lines += _table(
            [
                "answers of",
                "answers",
                "incoherent (share)",
                "empty",
                "repetitive",
                "high NLL",
                f"{p} successes",
                "of which incoherent",
                "mean clean-model NLL",
            ],
            crow,
        )
    return lines


def _agreement_section(result: ScanResult) -> list[str]:
    """Pairwise agreement of the judges."""
    s = result.summary
    lines: list[str] = []
    lines += [
        "",
        "## Judge agreement",
        "",
        (
            "Pairs of judges on the same cells: agreement = share of cells with the same verdict, κ = Cohen's kappa "
            "(agreement beyond chance; n/a when a judge is constant), 'only A' = cells A counts as a success and B "
            "does not."
        ),
        "",
    ]
    arows = []
    for name, entries in [("clean", s.get("clean", {}).get("agreement", []))] + [
        (a, s["attacks"][a].get("agreement", [])) for a in result.attacks
    ]:
        for e in entries:
            arows.append(
                [
                    name,
                    e["judges"][0],
                    e["judges"][1],
                    e["cells"],
                    fmt(e["agreement"]),
                    fmt(e["kappa"]),
                    e["only_a"],
                    e["only_b"],
                ]
            )
    lines += (
        _table(["answers of", "judge A", "judge B", "cells", "agreement", "κ", "only A", "only B"], arows)
        if arows
        else ["(one judge: nothing to compare)"]
    )
    return lines


def _best_of_n_section(result: ScanResult) -> list[str]:
    """Best-of-N beside greedy (when ``best_of_n > 1``)."""
    s = result.summary
    lines: list[str] = []
    if int(s.get("best_of_n") or 1) > 1:
        k = int(s["best_of_n"])
        lines += [
            "",
            f"## Best-of-{k} beside greedy",
            "",
            (
                f"Every cell also got {k} sampled answers under the same perturbation; a cell counts as broken when "
                "any sample is judged a success. Greedy numbers are the headline's."
            ),
            "",
        ]
        brows = []
        for a in result.attacks:
            for jn, b in s["attacks"][a]["best_of_n"].items():
                g = s["attacks"][a]["judges"][jn]
                brows.append(
                    [
                        a,
                        jn,
                        f"{fmt(g.get('init_mean'))} / {fmt(b.get('init'))}",
                        f"{fmt(g.get('pasr_mean'))} / {fmt(b.get('pasr_mean'))}",
                        f"{fmt(g.get('masr_mean'))} / {fmt(b.get('masr_mean'))}",
                    ]
                )
        lines += _table(
            ["attack", "judge", "INIT greedy / best-of-N", "PASR greedy / best-of-N", "MASR greedy / best-of-N"], brows
        )
    return lines


def _failures_section(result: ScanResult) -> list[str]:
    """Judge failures and the judges' caveats."""
    s = result.summary
    lines: list[str] = []
    lines += [
        "",
        "## Judge failures",
        "",
        (
            "A judge failure is a cell the judge could not rule on; it is excluded from that cell's rate (never "
            "counted as success or refusal) and counted here."
        ),
        "",
    ]
    lines += _table(
        ["judge", "clean failures"] + [f"{a} failures" for a in result.attacks],
        [[jn, s["init"][jn]["failures"]] + [s["failures"][a][jn] for a in result.attacks] for jn in result.judges],
    )
    lines += ["", "## Caveats", ""]
    if any(jn.startswith("keyword") and not jn.endswith("+coherent") for jn in result.judges):
        lines.append(KEYWORD_GIBBERISH_CAVEAT)
    for jn, c in s.get("judge_caveats", {}).items():
        if c and not jn.startswith("keyword"):
            lines.append(f"- {jn}: {c}")
    return lines


def _probes_section(result: ScanResult) -> list[str]:
    """The probes, the ASABench export and the figures (each when present)."""
    s = result.summary
    lines: list[str] = []
    if result.probes:
        pr = result.probes
        lines += [
            "",
            "## NLL probe and position KL",
            "",
            (
                f"Teacher-forced on each prompt's clean greedy answer (mean {fmt(pr['mean_response_tokens'], 1)} "
                f"tokens, clean NLL {fmt(pr['nll_clean_mean'])}); ASA noise at `{pr['positions']}` positions, seeds "
                f"{pr['seeds']}. ΔNLL > 0: the perturbation pushes away from the safe answer. Peak ΔNLL layer: "
                f"{_peak_probe_layer(pr.get('peak_delta_nll_layer'))}. Position KL = KL(clean || perturbed) of the "
                "distribution predicting "
                "generated token t."
            ),
            "",
        ]
        rows = []
        for l in pr["layers"]:
            e = pr["nll"][str(l)]
            curve = [v for v in (pr["position_kl"].get(str(l)) or []) if v is not None]
            rows.append(
                [
                    layer_name(l),
                    fmt(e["delta_nll_mean"]),
                    fmt(e["delta_nll_std"]),
                    fmt(e["frac_prompts_raised"]),
                    fmt(curve[0] if curve else None, 3),
                    fmt(curve[-1] if curve else None, 3),
                ]
            )
        lines += _table(["layer", "ΔNLL mean", "ΔNLL std", "prompts raised", "KL at t=0", "KL at last t"], rows)
    if s.get("asabench"):
        ab = s["asabench"]
        lines += [
            "",
            "## ASABench export",
            "",
            (
                f"{ab['n_instances']} successful (prompt, layer) instances ({ab['judge']} judge): {ab['n_train']} "
                f"train ({ab['train_prompts']} prompts), {ab['n_test']} test ({ab['test_prompts']} prompts), split "
                f"`{ab['split_mode']}` (prompt-disjoint: {ab['prompt_disjoint']})."
            ),
        ]
    figs = s.get("figures") or {}
    if figs:
        lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figs.items()]
    return lines


def _samples_section(result: ScanResult) -> list[str]:
    """A few answers at each attack's peak layer."""
    s = result.summary
    p = result.primary_judge
    lines: list[str] = []
    lines += ["", "## Sample generations", ""]
    for a in result.attacks:
        peak = s["attacks"][a]["headline"]["pasr_of_mean_lasr_layer"]
        if peak is None:
            continue
        for i in range(min(3, len(result.prompts))):
            rec = result.records.get(cell_key(a, result.seeds_run[a][0], i, peak))
            if rec is None:
                continue
            v = rec["verdicts"].get(p, {})
            verdict = "failure" if v.get("failed") else ("success" if v.get("success") else "refused")
            coherence = _coherence_text(rec)
            lines.append(
                f"- **{a}, layer {layer_name(peak)}, prompt {i}** ({p}: {verdict}"
                f"{'; ' + coherence if coherence else ''}): `{_oneline(result.prompts[i])}` "
                f"→ clean: `{_oneline(result.clean_responses[i])}` "
                f"→ attacked: `{_oneline(rec['response'])}`"
            )
    return lines


def _oneline(text: str, limit: int = 120) -> str:
    t = " ".join(str(text).split()).replace("`", "'")
    return t if len(t) <= limit else t[: limit - 1] + "…"


__all__ = ["KEYWORD_GIBBERISH_CAVEAT", "REPORT_FILE", "render_report"]
