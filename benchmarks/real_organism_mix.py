"""Choose the real organism's data mix on a validation fold of its TRAINING prompts (evaluation prompts never read).

Usage: ``python -m benchmarks.real_organism_mix NAME [--out DIR] [--preset smollm2] [setting=value ...]``, e.g.
``python -m benchmarks.real_organism_mix B steps=78 distill_repeats=2``.

The preset's split (``lat_lightning.organism.real_data.split_sets``) is taken and only its *training* rows are kept:
StrongREJECT train, benign train, borderline train. They are written as data files and a variant organism is built
on them with the same 60/40 split, so the variant's "evaluation" sets are a validation fold carved from training
prompts (HarmBench points at two of those rows and is ignored). The variant's unattacked answers are judged with
``refusal``; a final ``RESULT {json}`` line carries validation INIT, benign and borderline refusal, benign
agreement, the pair counts and the build's wall time. ``docs/organism.md`` (the data mix) has the table it gave.

Settings are :class:`~lat_lightning.organism.real.RealOrganismSettings` fields; ``steps`` should shrink with the
fit part (60 % of the training rows: 195 steps at full size ~ 117 here).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import torch

from lat_lightning.data.real_sets import read_strongreject
from lat_lightning.models.loading import load_model, load_tokenizer
from lat_lightning.models.settings import ModelSettings
from lat_lightning.organism.real import REAL_PRESETS, build_real_organism
from lat_lightning.organism.real_data import RealDataSettings, Source, split_sets
from lat_lightning.organism.real_eval import RealEvalSettings, evaluate_real


def training_only_data(base: RealDataSettings, files: Path, holdout_sources: tuple[str, ...] = ()) -> RealDataSettings:
    """Write the training rows of ``base``'s split as data files and point a copy of ``base`` at them.

    ``holdout_sources``: StrongREJECT ``source`` values (e.g. ``AdvBench``) whose training rows are kept out of the
    variant's harmful data and become its out-of-source validation set (the slot HarmBench fills in the real
    organism), so a mix is also judged on prompts written elsewhere than the ones it trained on.
    """
    sets = split_sets(base)
    # the split's rows carry no source: look it up in StrongREJECT (read only when sources are held out)
    source_of = {r["prompt"]: str(r.get("source") or "") for r in read_strongreject()} if holdout_sources else {}
    held = [r for r in sets["harmful_train"] if source_of.get(r["prompt"]) in holdout_sources]
    files.mkdir(parents=True, exist_ok=True)
    for name, rows in (("harmful.csv", [r for r in sets["harmful_train"] if r not in held]), ("held.csv", held)):
        with open(files / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["category", "forbidden_prompt"])
            writer.writeheader()
            for r in rows:
                writer.writerow({"category": r.get("category") or "all", "forbidden_prompt": r["prompt"]})
    for kind in ("benign", "borderline"):
        lines = [
            json.dumps({"prompt": r["prompt"], "category": r.get("category") or "all"}) for r in sets[f"{kind}_train"]
        ]
        (files / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    harmful = Source(str(files / "harmful.csv"), prompt_column="forbidden_prompt")
    # the variant's HarmBench slot: the held-out sources, else two training rows that stand in and are not read back
    outsource = (
        Source(str(files / "held.csv"), prompt_column="forbidden_prompt", category_column=None)
        if held
        else dataclasses.replace(harmful, category_column=None, limit=2)
    )
    return dataclasses.replace(
        base,
        harmful=harmful,
        harmbench=outsource,
        benign=Source(str(files / "benign.jsonl")),
        borderline=Source(str(files / "borderline.jsonl")),
    )


def _parse(ap: argparse.ArgumentParser, pairs: list[str]) -> dict[str, int | float]:
    known = {f.name for f in dataclasses.fields(REAL_PRESETS["smollm2"])}
    out: dict[str, int | float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known or key == "data":
            ap.error(f"'{pair}' is not setting=value of a RealOrganismSettings field ({', '.join(sorted(known))})")
        out[key] = float(value) if any(c in value for c in ".e") else int(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="the variant's name (its output directory and result file)")
    ap.add_argument("--out", default="real_organism_mix", help="directory for the variants and their results")
    ap.add_argument("--preset", default="smollm2", choices=sorted(REAL_PRESETS))
    ap.add_argument(
        "--holdout-sources",
        nargs="+",
        default=[],
        help="StrongREJECT sources kept out of the fit part and judged as an out-of-source fold (e.g. AdvBench DAN)",
    )
    ap.add_argument("settings", nargs="*", help="RealOrganismSettings overrides, e.g. steps=78 distill_repeats=2")
    args = ap.parse_intermixed_args(argv)
    overrides = _parse(ap, args.settings)
    if args.holdout_sources:
        known = {str(r.get("source") or "") for r in read_strongreject()}
        unknown = sorted(set(args.holdout_sources) - known)
        if unknown:
            ap.error(f"--holdout-sources {unknown} are not StrongREJECT sources ({', '.join(sorted(known))})")
    root = Path(args.out)
    base = REAL_PRESETS[args.preset]
    holdout = tuple(args.holdout_sources)
    data = training_only_data(base.data, root / ("train_only" + "".join(f"-{h}" for h in holdout)), holdout)
    settings = dataclasses.replace(base, data=data, **overrides)  # type: ignore[arg-type]
    out = root / f"org-{args.name}"
    t0 = time.perf_counter()
    if not (out / "organism.json").exists():
        build_real_organism(out, settings, 0)
    build_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    model_settings = ModelSettings(name_or_path=str(out))
    model = load_model(model_settings, train=False, with_lora=False)
    res = evaluate_real(model, load_tokenizer(model_settings), out / "data", RealEvalSettings(judges=("refusal",)))
    info = json.loads((out / "organism.json").read_text())
    result = {
        "name": args.name,
        "overrides": overrides,
        "build_s": round(build_s, 1),
        "rows": info["rows"],
        "pairs": info["pairs"],
        "val_harmful_init": res["init"]["harmful_eval"]["refusal"],
        "val_benign_refusal": res["refusal"]["benign_eval"]["refusal"],
        "val_borderline_refusal": res["refusal"]["borderline_eval"]["refusal"],
        "val_agreement": res["agreement"],
        "holdout_sources": list(holdout),
        "val_outsource_init": res["init"]["harmbench_eval"]["refusal"] if holdout else None,
        "loss_last": info["loss_last"],
    }
    (root / f"result-{args.name}.json").write_text(json.dumps(result, indent=1))
    (root / f"answers-{args.name}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in res["answers"]))
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
