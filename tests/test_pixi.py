"""pixi.toml (pixi itself is not installable here): every task runs something that exists in the
repo, and the dependencies match pyproject.toml's."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PIXI = tomllib.loads((REPO / "pixi.toml").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

REQUIRED_TASKS = {"demo", "test", "generate", "audit", "gui", "mojo-generate", "lock"}
# conda package name -> PyPI name, where they differ beyond PEP 503 normalisation
CONDA_TO_PYPI = {"pytorch": "torch"}
# executables a task may start, and the dependency that provides each
EXECUTABLES = {"python": "python", "streamlit": "streamlit", "mojo": "mojo", "pytest": "pytest", "make": None}


def _tasks() -> dict[str, str]:
    out = {}
    for name, task in PIXI["tasks"].items():
        out[name] = task if isinstance(task, str) else task["cmd"]
    return out


def _all_pixi_deps() -> dict[str, str]:
    """Every dependency of every feature, as {canonical PyPI name: version spec}."""
    deps: dict[str, str] = {}
    tables = [PIXI]
    tables += list(PIXI.get("feature", {}).values())
    for table in tables:
        for key in ("dependencies", "pypi-dependencies"):
            for name, spec in table.get(key, {}).items():
                deps[canonicalize_name(CONDA_TO_PYPI.get(name, name))] = spec
    return deps


def _makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def _pixi_specifier(spec) -> SpecifierSet:
    """A conda ("26.7.*", ">=1.0") or PEP 440 ("==2.13.0") spec as a PEP 440 SpecifierSet."""
    assert isinstance(spec, str), f"unexpected spec {spec!r}"
    parts = []
    for part in spec.split(","):
        part = part.strip()
        if part and part[0].isdigit():
            part = "==" + part
        parts.append(part)
    return SpecifierSet(",".join(parts))


def test_manifest_basics():
    ws = PIXI["workspace"]
    assert ws["name"] == PYPROJECT["project"]["name"]
    assert ws["version"] == PYPROJECT["project"]["version"]
    assert "conda-forge" in ws["channels"]
    assert "https://conda.modular.com/max" in ws["channels"]
    assert {"linux-64", "osx-arm64"} <= set(ws["platforms"])
    # The Python pin must satisfy the package's requires-python.
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    python = _pixi_specifier(PIXI["dependencies"]["python"])
    assert "3.11.0" in python and "3.11.0" in requires


def test_required_tasks_exist():
    assert REQUIRED_TASKS <= set(_tasks())


@pytest.mark.parametrize("name", sorted(REQUIRED_TASKS))
def test_task_runs_something_that_exists(name: str):
    cmd = shlex.split(_tasks()[name])
    exe = cmd[0]
    assert exe in EXECUTABLES, f"task {name}: unknown executable {exe!r}"
    if exe == "make":
        assert cmd[1] in _makefile_targets(), f"task {name}: no make target {cmd[1]!r}"
        return
    provider = EXECUTABLES[exe]
    assert canonicalize_name(provider) in _all_pixi_deps(), f"task {name}: {exe} is not a dependency"
    # The script or file the task runs must be in the repo.
    files = [a for a in cmd[1:] if re.search(r"\.(py|mojo)$", a)]
    if exe == "python" and cmd[1:3] == ["-m", "pytest"]:
        assert (REPO / "tests").is_dir()
        assert canonicalize_name("pytest") in _all_pixi_deps()
        return
    assert files, f"task {name}: runs no file from the repo: {cmd}"
    for f in files:
        assert (REPO / f).is_file(), f"task {name}: {f} does not exist"


def test_dependencies_match_pyproject():
    project = PYPROJECT["project"]
    wanted: list[Requirement] = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        wanted += [Requirement(r) for r in extra]
    pixi = _all_pixi_deps()
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pixi, f"{req.name} (pyproject) is missing from pixi.toml"
        pin = _pixi_specifier(pixi[name])
        assert str(pin) == str(req.specifier) or set(pin) == set(req.specifier), (
            f"{req.name}: pixi.toml pins {pixi[name]!r}, pyproject {str(req.specifier)!r}")
    # And nothing in pixi.toml that pyproject does not know (besides python and the project itself).
    known = {canonicalize_name(r.name) for r in wanted} | {"python", canonicalize_name(project["name"])}
    assert set(pixi) <= known, f"pixi.toml has extra dependencies: {sorted(set(pixi) - known)}"


def test_project_installed_editable():
    sd = PIXI["pypi-dependencies"]["sdsecure"]
    assert sd == {"path": ".", "editable": True}


@pytest.mark.parametrize("name", ["demo", "generate", "audit", "lock"])
def test_python_task_accepts_its_arguments(name: str):
    """The task's command line parses: the same command with --help exits 0 (argparse checks
    subcommands and flags before printing help)."""
    import subprocess
    import sys

    cmd = shlex.split(_tasks()[name])
    assert cmd[0] == "python"
    res = subprocess.run([sys.executable, *cmd[1:], "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"task {name}: {res.stderr[-2000:]}"
    assert "usage" in res.stdout.lower()
