"""The benchmarks' main command: --help prints usage (and runs nothing), the run plan, the step guard."""

import os
import subprocess
import sys

import pytest

from benchmarks import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [["-m", "benchmarks", "--help"], ["-m", "kvmemory.bench", "--help"]])
def test_help_prints_usage_and_exits(command):
    out = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m benchmarks")
    assert "--quick" in out.stdout and "--step-args" in out.stdout
    assert "[benchmarks]" not in out.stderr       # nothing ran


def test_default_plan_includes_the_small_step():
    assert cli.plan([]) == [("exact_speed", []), ("ann", []), ("step", ["--quick"])]


def test_quick_selection_skip_and_pass_through():
    assert cli.plan(["--quick"]) == [("exact_speed", ["--small"]), ("ann", ["--small"]), ("step", ["--quick"])]
    assert cli.plan(["step", "exact_speed"]) == [("step", ["--quick"]), ("exact_speed", [])]
    assert cli.plan(["--skip", "ann,step"]) == [("exact_speed", [])]
    assert cli.plan(["ann", "--ann-args", "--backends exact,faiss --small"]) == [
        ("ann", ["--backends", "exact,faiss", "--small"])]
    assert cli.plan(["step", "--step-args="]) == [("step", [])]


@pytest.mark.parametrize("argv", [["nope"], ["--skip", "ann,nope"]])
def test_unknown_benchmark(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.plan(argv)
    assert e.value.code == 2
    assert "unknown benchmark 'nope'; expected any of exact_speed, ann, step" in capsys.readouterr().err


def test_list_prints_the_plan(capsys):
    with pytest.raises(SystemExit) as e:
        cli.plan(["--list", "--quick", "ann"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split() == ["ann", "python", "-m", "benchmarks.ann", "--small"]


def test_missing_module_is_skipped_not_fatal(monkeypatch, capsys):
    """A checkout without benchmarks/step.py still runs the rest (the import is lazy and guarded)."""
    ran = []

    def fake_import(name):
        if name == "benchmarks.step":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = type(sys)("fake")
        module.main = lambda argv: ran.append((name, argv))
        return module

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["--quick"]) == 0
    assert ran == [("benchmarks.exact_speed", ["--small"]), ("benchmarks.ann", ["--small"])]
    assert "step: skipped, benchmarks/step.py is not in this checkout" in capsys.readouterr().err

    def broken(name):               # an import error inside a benchmark is not swallowed
        raise ModuleNotFoundError("No module named 'somelib'", name="somelib")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somelib"):
        cli.main(["step"])
