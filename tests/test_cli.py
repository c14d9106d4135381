"""The command line: override spellings, --print-config, errors with suggestions, recipes, run directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lat_lightning import pipeline
from lat_lightning.cli import list_recipes, load_config, main, recipes_dir, split_argv
from lat_lightning.errors import ConfigError
from lat_lightning.rundir import create_run_dir, mark_stage_done, stage_done

REPO = Path(__file__).resolve().parents[1]
RECIPE = "lapt_llama3"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


def _resolved(*argv) -> dict:
    flags, dotlist = split_argv(argv)
    return OmegaConf.to_container(load_config(flags["recipe"], dotlist))


# --- override spellings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("trainer.max_steps", "3", 3),
        ("model.lora.r", "8", 8),
        ("trainer.lr", "2e-5", 2e-5),
        ("model.lora.enabled", "true", True),
        ("perturbation.layers", "[3,5]", [3, 5]),
        ("model.name_or_path", "some/model", "some/model"),
    ],
)
def test_override_spellings_are_equivalent(key, value, expected):
    forms = [
        ["--recipe", RECIPE, f"{key}={value}"],
        ["--recipe", RECIPE, f"--{key}={value}"],
        ["--recipe", RECIPE, f"--{key}", value],
        [f"--recipe={RECIPE}", f"--{key}", value],
        [f"--{key}", value, "--recipe", RECIPE],
    ]
    # every spelling parses to the same flags and the same normalised override
    parsed = [split_argv(form) for form in forms]
    assert all(p == parsed[0] for p in parsed)
    flags, dotlist = parsed[0]
    assert flags["recipe"] == RECIPE and dotlist == [f"{key}={value}"]
    cfg = load_config(flags["recipe"], dotlist)
    assert OmegaConf.select(cfg, key) == expected
    assert OmegaConf.select(load_config(RECIPE), key) != expected


def test_later_overrides_win():
    cfg = _resolved("--recipe", RECIPE, "trainer.max_steps=3", "--trainer.max_steps", "5")
    assert cfg["trainer"]["max_steps"] == 5


def test_print_config_shows_both_overrides(capsys):
    code, out, err = _run(capsys, "--recipe", RECIPE, "--print-config", "model.lora.r=8", "--trainer.max_steps", "3")
    assert code == 0 and err == ""
    printed = OmegaConf.create(out)
    assert printed.model.lora.r == 8
    assert printed.trainer.max_steps == 3
    assert printed.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"  # the rest is the recipe
    # the printed config is complete: every schema section is present
    assert set(printed.keys()) >= {
        "stages",
        "model",
        "data",
        "perturbation",
        "loss",
        "trainer",
        "logging",
        "callbacks",
        "evaluation",
    }


def test_train_py_script_prints_config_and_exits_0():
    """The one subprocess: the real script, its stdout, and its exit status."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--recipe",
            RECIPE,
            "--print-config",
            "model.lora.r=8",
            "--trainer.max_steps",
            "3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.model.lora.r == 8 and printed.trainer.max_steps == 3


# --- errors: one line, exit 2, a suggestion -----------------------------------------------------------


def test_misspelt_section_suggests_model(capsys):
    code, out, err = _run(capsys, "--recipe", RECIPE, "--print-config", "modle.name=x")
    assert code == 2 and out == ""
    line = _error_line(err)
    assert "modle" in line and "'model'" in line


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("trainer.max_step=3", "trainer.max_steps"),
        ("--model.lora.target_module=[q_proj]", "model.lora.target_modules"),
        ("perturbation.eps_mod=relative", "perturbation.eps_mode"),
        ("callbacks.kl_teacher.weigth=1", "callbacks.kl_teacher.weight"),
    ],
)
def test_unknown_nested_key_suggests_closest(capsys, override, suggestion):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", override)
    assert code == 2
    line = _error_line(err)
    assert f"'{suggestion}'" in line
    assert override.lstrip("-").split("=")[0] in line


def test_unknown_key_without_close_match_lists_valid_keys(capsys):
    code, _, err = _run(capsys, "--recipe", RECIPE, "trainer.zzzzzz=1")
    assert code == 2
    line = _error_line(err)
    assert "trainer.zzzzzz" in line and "max_steps" in line


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model.lora.r=1.5", "model.lora.r"),
        ("data.harmful_columns=3", "data.harmful_columns"),
    ],
)
def test_wrong_type_names_the_key(capsys, override, key):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", override)
    assert code == 2
    assert f"'{key}'" in _error_line(err)


@pytest.mark.parametrize("override,key", [("model.lora=3", "model.lora"), ("model=x", "model")])
def test_value_given_for_a_section_names_the_key(capsys, override, key):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", override)
    assert code == 2
    line = _error_line(err)
    assert f"'{key}'" in line and "section" in line


def test_invalid_choice_suggests_closest(capsys):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", "perturbation.positions=respons")
    assert code == 2
    line = _error_line(err)
    assert "perturbation.positions" in line and "'response'" in line


def test_unknown_attack_lists_the_registered_ones(capsys):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", "perturbation.attack=gausian")
    assert code == 2
    line = _error_line(err)
    assert "perturbation.attack" in line and "asa_random, asagrad, pgd" in line


@pytest.mark.parametrize(
    "override,new",
    [
        ("perturbation.strategy=pgd", "perturbation.attack"),
        ("perturbation.toward=1.0", "perturbation.toward_harmful"),
        ("perturbation.away=0.5", "perturbation.away_from_safe"),
        ("loss.toward=1.0", "loss.toward_safe"),
        ("loss.away=0.5", "loss.away_from_harmful"),
    ],
)
def test_old_keys_name_their_new_key(capsys, override, new):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", override)
    assert code == 2
    line = _error_line(err)
    assert f"'{override.split('=')[0]}' was renamed '{new}'" in line


@pytest.mark.parametrize(
    "override,new",
    [
        ("perturbation.attack=gaussian_normalised", "asa_random"),
        ("perturbation.attack=sign_gradient", "asagrad"),
        ("evaluation.attacks=[gaussian_normalised]", "asa_random"),
    ],
)
def test_old_attack_names_name_their_new_name(capsys, override, new):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", override)
    assert code == 2
    assert f"was renamed '{new}'" in _error_line(err)


def test_removed_key_says_why(capsys):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", "perturbation.stats_source=self")
    assert code == 2
    assert "'perturbation.stats_source' was removed" in _error_line(err)


def test_unknown_stage_suggests_closest(capsys):
    code, _, err = _run(capsys, "--recipe", RECIPE, "--print-config", "stages=[fitt]")
    assert code == 2
    assert "'fit'" in _error_line(err)


def test_unknown_recipe_suggests_closest(capsys):
    code, _, err = _run(capsys, "--recipe", "lapt_lama3", "--print-config")
    assert code == 2
    line = _error_line(err)
    assert "lapt_lama3" in line and "'lapt_llama3'" in line


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--recipe", RECIPE, "--trainer.max_steps"], "no value"),
        (["--recipe", RECIPE, "--trainer.max_steps", "--print-config"], "no value"),
        (["--recipe", RECIPE, "stray"], "cannot parse argument 'stray'"),
        (["--recipe"], "needs a value"),
    ],
)
def test_malformed_arguments(capsys, argv, fragment):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert fragment in _error_line(err)


def test_help(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "usage:" in out and "--list-recipes" in out


# --- recipes ------------------------------------------------------------------------------------------


def test_list_recipes_prints_each_with_its_first_comment_line(capsys):
    code, out, err = _run(capsys, "--list-recipes")
    assert code == 0 and err == ""
    lines = out.splitlines()
    shipped = sorted(REPO.glob("recipes/*.yaml"))
    assert shipped and len(lines) == len(shipped)
    for path, line in zip(shipped, lines):
        first = next(x for x in path.read_text().splitlines() if x.startswith("#")).lstrip("#").strip()
        assert line.split()[0] == path.stem
        assert line.endswith(first) and first
    assert [name for name, _ in list_recipes()] == [p.stem for p in shipped]


def test_recipes_dir_is_the_top_level_folder():
    assert recipes_dir().resolve() == (REPO / "recipes").resolve()


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_recipe_as_a_path_to_any_yaml(capsys, tmp_path, suffix):
    path = tmp_path / f"my_experiment{suffix}"
    path.write_text("# my own run\nstages: [scan]\ntrainer:\n  max_steps: 7\nmodel:\n  lora:\n    r: 2\n")
    cfg = load_config(str(path), ["model.lora.alpha=4"])
    assert list(cfg.stages) == ["scan"] and cfg.trainer.max_steps == 7
    assert cfg.model.lora.r == 2 and cfg.model.lora.alpha == 4
    assert cfg.trainer.lr == 1e-4  # unspecified keys keep the schema defaults
    code, out, _ = _run(capsys, "--recipe", str(path), "--print-config")
    assert code == 0 and OmegaConf.create(out).trainer.max_steps == 7


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("trainer:\n  max_stepz: 3\n", "trainer.max_steps"),
        ("- just\n- a list\n", "mapping"),
        ("trainer: {max_steps: [\n", "cannot read recipe"),
    ],
)
def test_bad_recipe_file(capsys, tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = _run(capsys, "--recipe", str(path), "--print-config")
    assert code == 2
    assert fragment in _error_line(err)


def test_missing_recipe_path_is_an_error():
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_config("/no/such/recipe.yaml")


def test_config_is_struct_typed():
    from omegaconf.errors import ConfigAttributeError, ValidationError

    cfg = load_config(RECIPE)
    with pytest.raises(ConfigAttributeError):
        cfg.trainer.not_a_key = 1
    with pytest.raises(ValidationError):
        cfg.trainer.max_steps = "many"


# --- run directories ----------------------------------------------------------------------------------


def _cfg(root: Path, *extra: str):
    return load_config(RECIPE, [f"logging.root_dir={root}", *extra])


def test_run_directories_are_versioned_and_never_overwritten(tmp_path):
    cfg = _cfg(tmp_path)
    first = create_run_dir(cfg, RECIPE)
    assert first == tmp_path / "lapt_llama3" / "version_0"
    saved = (first / "config.yaml").read_text()
    assert OmegaConf.to_container(OmegaConf.load(first / "config.yaml")) == OmegaConf.to_container(cfg)
    (first / "result.txt").write_text("keep me")

    second = create_run_dir(_cfg(tmp_path, "trainer.max_steps=3"), RECIPE)
    assert second == tmp_path / "lapt_llama3" / "version_1"
    assert OmegaConf.load(second / "config.yaml").trainer.max_steps == 3
    assert (first / "config.yaml").read_text() == saved and (first / "result.txt").read_text() == "keep me"

    (tmp_path / "lapt_llama3" / "version_7").mkdir()  # numbering continues after the highest version
    assert create_run_dir(cfg, RECIPE).name == "version_8"


def test_run_name_defaults_to_the_recipe_stem(tmp_path):
    cfg = _cfg(tmp_path, "logging.name=null")
    assert create_run_dir(cfg, "/some/where/my_recipe.yaml") == tmp_path / "my_recipe" / "version_0"


def test_explicit_version_is_never_reused(tmp_path):
    cfg = _cfg(tmp_path, "logging.version=baseline")
    run = create_run_dir(cfg, RECIPE)
    assert run.name == "baseline"
    with pytest.raises(ConfigError, match="already exists"):
        create_run_dir(cfg, RECIPE)


def test_resume_reuses_the_directory_and_keeps_the_original_config(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="no earlier run"):
        create_run_dir(cfg, RECIPE, resume="last")
    run = create_run_dir(cfg, RECIPE)
    saved = (run / "config.yaml").read_text()
    again = create_run_dir(_cfg(tmp_path, "trainer.max_steps=9"), RECIPE, resume="last")
    assert again == run
    assert (run / "config.yaml").read_text() == saved
    assert OmegaConf.load(run / "config.resumed.yaml").trainer.max_steps == 9

    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_text("")
    assert create_run_dir(cfg, RECIPE, resume=str(ckpt)) == run
    assert create_run_dir(cfg, RECIPE, resume=str(run)) == run
    with pytest.raises(ConfigError, match="does not exist"):
        create_run_dir(cfg, RECIPE, resume=str(tmp_path / "nope"))


def test_a_key_added_after_the_run_started_counts_as_its_default_on_resume(tmp_path):
    """A run saved before a config key existed behaved as the key's default: resuming with the default is no
    change; another value is refused, the message saying the run predates the key and what that meant."""
    from lat_lightning.rundir import check_resume

    run = create_run_dir(_cfg(tmp_path), RECIPE)
    saved = OmegaConf.load(run / "config.yaml")
    del saved.evaluation.durability["layers"]  # as written by a version without the key
    OmegaConf.save(saved, run / "config.yaml")
    assert check_resume(run, _cfg(tmp_path)) == {}
    with pytest.raises(ConfigError) as err:
        check_resume(run, _cfg(tmp_path, "evaluation.durability.layers=[1]"))
    assert "evaluation.durability.layers: <absent> (the run predates the key: its default None) -> [1]" in str(
        err.value
    )
    with pytest.raises(ConfigError, match=r"perturbation.eps: 6.0 -> 1.0"):  # present keys as before
        check_resume(run, _cfg(tmp_path, "perturbation.eps=1.0"))


def test_main_runs_the_stages_in_a_new_run_directory(capsys, tmp_path, monkeypatch):
    """End to end through main(): stages dispatched in order, config saved, resume skips finished stages."""
    calls = []

    def fake_stage(name):
        def stage(cfg, run_dir):
            calls.append((name, Path(run_dir)))
            return {"stage": name}

        return stage

    monkeypatch.setattr(pipeline, "get_stage", fake_stage)
    recipe = tmp_path / "two_stages.yaml"
    # A model other than the default organism: the pipeline would build the organism before any stage.
    recipe.write_text(
        f"# two stages\nstages: [scan, evaluate]\nmodel:\n  name_or_path: tiny:llama\n"
        "data:\n  eval_harmful: pkg://lat_lightning/resources/tiny_harmful.jsonl\n"
        f"logging:\n  root_dir: {tmp_path / 'runs'}\n"
    )
    code, out, err = _run(capsys, "--recipe", str(recipe), "trainer.max_steps=2")
    assert code == 0, err
    run = tmp_path / "runs" / "two_stages" / "version_0"
    assert calls == [("scan", run), ("evaluate", run)]
    assert f"run directory: {run}" in out
    assert OmegaConf.load(run / "config.yaml").trainer.max_steps == 2
    assert stage_done(run, "scan") and stage_done(run, "evaluate")

    calls.clear()
    (run / "stages" / "evaluate.done.json").unlink()
    code, out, _ = _run(capsys, "--recipe", str(recipe), "--resume", "last")
    assert code == 0
    assert calls == [("evaluate", run)] and "[scan] already done" in out
    mark_stage_done(run, "report", {"x": 1})
    assert stage_done(run, "report")


def test_unexpected_failure_is_one_line_exit_1(capsys, tmp_path, monkeypatch):
    def broken(name):
        def stage(cfg, run_dir):
            raise RuntimeError("kaboom\nsecond line")

        return stage

    monkeypatch.setattr(pipeline, "get_stage", broken)
    local = "lat_tiny"  # a model the preflight finds offline, so the run reaches its (broken) stage
    code, _, err = _run(capsys, "--recipe", local, f"logging.root_dir={tmp_path}")
    assert code == 1
    line = _error_line(err)
    assert "RuntimeError: kaboom" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["--recipe", local, f"logging.root_dir={tmp_path}", "--debug"])
