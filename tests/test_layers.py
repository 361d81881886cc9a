"""The architecture as a checked contract: imports go one way (import-linter's layers contract in
pyproject.toml), first-party imports sit at module top, and every CLI flag that fills a config field keeps the
field's default."""

import argparse
import ast
import dataclasses
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("cli", "orchestration", "learner", "actors", "replay", "inference_server", "csil")
# (module, imported first-party module): imports that must stay lazy, and why.
LAZY = {
    # the openpi backend runs in openpi's own environment, which lacks our pinned jax/flax model stack
    ("inference_server/backends.py", "csil.base_policy"),
}
CLIS = ("base", "bench", "demos", "evaluate", "experiment", "launch", "scale", "serve", "train")


def test_layers_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def _function_level_imports():
    for package in FIRST_PARTY:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and sub.module:
                        names = [sub.module]
                    elif isinstance(sub, ast.Import):
                        names = [alias.name for alias in sub.names]
                    else:
                        continue
                    for name in names:
                        if name.split(".")[0] in FIRST_PARTY:
                            yield str(path.relative_to(ROOT)), name


def test_first_party_imports_are_at_module_top():
    inside = set(_function_level_imports())
    assert inside - LAZY == set(), "first-party imports inside functions (move them up, or justify in LAZY)"


def _field_flags(module: str) -> list[argparse.Action]:
    parser = importlib.import_module(f"cli.{module}").build_parser()
    parsers = [parser] + [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    return [a for p in parsers for a in p._actions if "." in a.dest]


@pytest.mark.parametrize("module", CLIS)
def test_cli_flags_are_config_fields_with_their_defaults(module):
    import csil.config as config

    for action in _field_flags(module):
        cls_name, name = action.dest.split(".")
        cls = getattr(config, cls_name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert name in fields, f"csil-{module} {action.option_strings[0]}: {cls_name} has no field {name!r}"
        default = fields[name].default
        if action.default is not None:  # None: "the preset's / computed at run time", said in the help
            parsed = action.type(action.default) if isinstance(action.default, str) and action.type else action.default
            assert parsed == default, f"csil-{module} {action.option_strings[0]}: {parsed!r} != {cls_name}.{name}"


def test_main_clis_expose_their_configs():
    """csil-train and csil-launch offer every run field a user sets (the rest is internal)."""
    import csil.config as config

    internal = {"agent"}
    for module, cls in (("train", config.TrainConfig), ("launch", config.LaunchConfig)):
        flagged = {a.dest.split(".")[1] for a in _field_flags(module) if a.dest.startswith(cls.__name__ + ".")}
        missing = {f.name for f in dataclasses.fields(cls)} - flagged - internal
        assert not missing, f"csil-{module} has no flag for {sorted(missing)}"
