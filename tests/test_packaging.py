"""Packaging: dependency lists agree, top-level folders install as subpackages, console script exists.

A non-editable ``pip install .`` is checked by hand (it takes a throwaway venv); this file checks the
editable install the Makefile makes and the metadata both installs are built from.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata as md
import re
import sysconfig
from importlib import resources
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def _lines(value: str) -> list[str]:
    return [x.strip() for x in value.splitlines() if x.strip() and not x.strip().startswith("#")]


def setup_cfg_requirements() -> dict[str, Requirement]:
    cfg = _setup_cfg()
    reqs = [Requirement(x) for x in _lines(cfg["options"]["install_requires"])]
    for extra in cfg["options.extras_require"]:
        reqs += [Requirement(x) for x in _lines(cfg["options.extras_require"][extra])]
    return {_norm(r.name): r for r in reqs}


def environment_requirements() -> dict[str, Requirement]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs one pip section"
    reqs = [Requirement(x) for x in pip[0] if not x.startswith("-")]  # skip pip options such as `-e .`
    return {_norm(r.name): r for r in reqs}


def test_environment_yml_basics():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["name"] == "lat-lightning"
    assert "python=3.11" in env["dependencies"] and "pip" in env["dependencies"]


def test_environment_yml_and_setup_cfg_list_the_same_dependencies():
    declared, env = setup_cfg_requirements(), environment_requirements()
    assert {"torch", "lightning", "transformers", "peft", "bitsandbytes", "pytest", "ruff"} <= set(declared)
    missing, extra = sorted(set(declared) - set(env)), sorted(set(env) - set(declared))
    assert not missing and not extra, f"only in setup.cfg: {missing}; only in environment.yml: {extra}"


def test_environment_yml_versions_fit_setup_cfg():
    """Same specifier, or an exact pin the setup.cfg range allows (torch==2.13.0)."""
    declared, env = setup_cfg_requirements(), environment_requirements()
    for name, req in env.items():
        want = declared[name].specifier
        if req.specifier == want:
            continue
        pins = [s for s in req.specifier if s.operator == "=="]
        assert pins and all(want.contains(p.version, prereleases=True) for p in pins), (
            f"{name}: environment.yml has '{req.specifier}', setup.cfg has '{want}'"
        )
    assert env["torch"].specifier == SpecifierSet("==2.13.0")


def test_setup_cfg_maps_top_level_folders_into_the_package():
    cfg = _setup_cfg()
    packages = _lines(cfg["options"]["packages"])
    assert {"lat_lightning.recipes", "lat_lightning.callbacks"} <= set(packages)
    mapping = dict(line.replace(" ", "").split("=") for line in _lines(cfg["options"]["package_dir"]))
    assert mapping == {"lat_lightning.recipes": "recipes", "lat_lightning.callbacks": "callbacks"}
    assert "*.yaml" in cfg["options.package_data"]["lat_lightning.recipes"]
    for folder in ("recipes", "callbacks"):
        assert (REPO / folder / "__init__.py").is_file()
    # every subpackage on disk is listed (setup.cfg lists packages by hand)
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lat_lightning").rglob("__init__.py")}
    assert on_disk <= set(packages), f"not listed in setup.cfg: {sorted(on_disk - set(packages))}"


@pytest.mark.parametrize("sub,folder", [("recipes", "recipes"), ("callbacks", "callbacks")])
def test_top_level_folders_import_from_the_installed_package(sub, folder):
    module = importlib.import_module(f"lat_lightning.{sub}")
    assert Path(module.__file__).resolve().parent == (REPO / folder).resolve()


def test_recipes_are_reachable_as_package_resources():
    files = {p.name for p in resources.files("lat_lightning.recipes").iterdir()}
    shipped = {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert shipped and shipped <= files


def test_shipped_data_files_are_package_data():
    """Every data file in lat_lightning/resources (the real prompt sets included) matches a package_data pattern,
    so a non-editable install ships it."""
    patterns = [x.strip() for x in _setup_cfg()["options.package_data"]["lat_lightning.resources"].split(",")]
    data = [p for p in (REPO / "lat_lightning" / "resources").iterdir() if p.is_file() and p.suffix != ".py"]
    assert {"real_benign.jsonl", "real_borderline.jsonl"} <= {p.name for p in data}
    unshipped = [p.name for p in data if not any(p.match(pat) for pat in patterns)]
    assert not unshipped, f"not in [options.package_data] lat_lightning.resources: {unshipped}"
    installed = {p.name for p in resources.files("lat_lightning.resources").iterdir()}
    assert {p.name for p in data} <= installed


STALE = (
    "the installed package is out of date with setup.cfg: rerun `make test` (it reinstalls when setup.cfg "
    "changes) or `pip install -e '.[dev,quant,gguf]'`"
)


def _declared_console_scripts() -> dict[str, str]:
    lines = _lines(_setup_cfg()["options.entry_points"]["console_scripts"])
    return {name.strip(): target.strip() for name, target in (line.split("=", 1) for line in lines)}


def test_installed_distribution_metadata():
    dist = md.distribution("lat-lightning")
    import lat_lightning

    assert dist.version == lat_lightning.__version__
    declared = _declared_console_scripts()
    assert declared == {"lat-lightning": "lat_lightning.cli:entry"}
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == declared, STALE
    requires = {_norm(Requirement(r).name) for r in dist.requires or []}
    assert requires == set(setup_cfg_requirements()), STALE


def test_console_script_exists_in_the_venv():
    script = Path(sysconfig.get_path("scripts")) / "lat-lightning"
    assert script.is_file(), f"{script} missing: {STALE}"
    module, func = _declared_console_scripts()["lat-lightning"].split(":")
    assert f"from {module} import {func}" in script.read_text(), STALE
    assert callable(getattr(importlib.import_module(module), func))


def test_package_data_ships_the_default_organism():
    """setup.cfg's patterns for lat_lightning.resources take every file of the shipped organism into a wheel (a
    pattern that missed one would install a package that builds on every host again, or cannot load the model)."""
    from fnmatch import fnmatch

    from lat_lightning.organism.shipped import SHIPPED_DIRNAME, SHIPPED_FILES

    patterns = [p.strip() for p in _setup_cfg()["options.package_data"]["lat_lightning.resources"].split(",")]
    folder = REPO / "lat_lightning" / "resources" / SHIPPED_DIRNAME
    on_disk = sorted(p.name for p in folder.iterdir())
    assert on_disk == sorted(SHIPPED_FILES), "the shipped folder holds exactly the files a load needs"
    for name in on_disk:
        assert any(fnmatch(f"{SHIPPED_DIRNAME}/{name}", p) for p in patterns), f"{name} is not in package_data"
