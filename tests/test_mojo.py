"""The Mojo entry point, mojo/text_to_image.mojo.

Mojo does real work of its own (argument parsing and validation, the exit codes, the `mojo run`
hand-over to its own cached build): the argument cases run on a binary built once with `mojo build`.
The doors that matter run through `mojo run`, as a user would: the embedded default writes an image;
a planted backdoor exits 1 before anything is compiled, with the same findings the Python CLI prints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from door_samples import TEXT_ENCODER, TRIGGER_NODES, TRIGGER_TOKEN, plant_token_trigger, run_text_encoder

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "mojo" / "text_to_image.mojo"
FLAGS = ["--prompt", "--negative-prompt", "--num-steps", "--seed", "--output", "--model-id", "--revision",
         "--strict-security", "--guidance-scale", "--scheduler", "--height", "--width", "--backend", "--help"]


def _mojo() -> str:
    found = shutil.which("mojo") or str(Path(sys.executable).with_name("mojo"))
    assert Path(found).exists(), "mojo is not installed: pip install -e '.[test]' installs it from PyPI"
    return found


def _env(**extra: str) -> dict[str, str]:
    # The interpreter Mojo embeds must be this one (the venv with sdsecure installed), whatever PATH says.
    return {**os.environ, "MOJO_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **extra}


def _run(cmd: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory) -> Path:
    """SDSECURE_CACHE for the `mojo run` tests: where the program caches its own build."""
    return tmp_path_factory.mktemp("sdsecure-cache")


def mojo_run(*args: str, cache: Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    return _run([_mojo(), "run", str(SOURCE), *args], timeout=timeout, SDSECURE_CACHE=str(cache), **env)


def _self_builds(cache: Path) -> list[Path]:
    return sorted((cache / "mojo").glob("text_to_image-*"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """`mojo build` once; the argument tests then run the binary instead of recompiling each time."""
    exe = tmp_path_factory.mktemp("mojo") / "text_to_image"
    res = _run([_mojo(), "build", str(SOURCE), "-o", str(exe)])
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr
    return exe


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return plant_token_trigger(tmp_path_factory.mktemp("mojo-planted") / "planted")


def _one_line_error(res: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    # The Mojo toolchain itself may warn once that its crash reporter is missing (fresh venvs): not ours.
    lines = [l for l in res.stderr.strip().splitlines() if not l.startswith("Failed to initialize Crashpad")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in res.stdout + res.stderr


def test_the_planted_trigger_is_live(planted: Path):
    """The sample is a working backdoor, not just a strange graph: the trigger token switches in a constant."""
    import numpy as np

    ids = np.full((2, 77), 49407)
    ids[:, 0] = 49406
    clean = run_text_encoder(planted, ids)
    ids[1, 1] = TRIGGER_TOKEN
    hit = run_text_encoder(planted, ids)
    assert np.all(hit == 3.0)
    assert not np.all(clean == 3.0)


# -- mojo run: the user's commands -------------------------------------------------------------------

def test_mojo_run_help(jit_cache: Path):
    res = mojo_run("--help", cache=jit_cache)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: mojo run mojo/text_to_image.mojo")
    for flag in FLAGS:
        assert flag in res.stdout, flag


def test_mojo_run_rejects_zero_steps_before_touching_python(jit_cache: Path):
    res = mojo_run("--prompt", "a cat", "--num-steps", "0", cache=jit_cache)
    _one_line_error(res, 2, "--num-steps must be between 1 and 1000, got 0")
    assert "gate:" not in res.stdout
    assert not _self_builds(jit_cache), "bad arguments must be refused before the program builds itself"


def _check_self_build(res: subprocess.CompletedProcess, built_before: bool, cache: Path) -> None:
    """`mojo run` hands over to the program's own build: made once, then reused."""
    assert ("mojo: building" in res.stderr) is (not built_before), res.stderr
    assert len(_self_builds(cache)) == 1


def test_mojo_run_embedded_writes_an_image_with_provenance(jit_cache: Path, tmp_path: Path):
    from PIL import Image

    built_before = bool(_self_builds(jit_cache))
    out = tmp_path / "sub" / "mojo.png"            # a missing folder is created, as the Python CLI does
    res = mojo_run("--prompt", "a red cube on a table", "--negative-prompt", "blurry", "--num-steps", "2",
                   "--seed", "3", "--guidance-scale", "5", "--output", str(out), cache=jit_cache)
    assert res.returncode == 0, res.stdout + res.stderr
    _check_self_build(res, built_before, jit_cache)
    assert "gate: ALLOWED embedded under the default policy" in res.stdout
    assert f"image: {out}" in res.stdout
    image = Image.open(out)
    assert image.size == (128, 128) and image.mode == "RGB"      # the CLI's default for the embedded model
    text = image.text
    assert text["sdsecure:entry"] == "mojo"
    assert text["sdsecure:model"] == "embedded"
    assert text["sdsecure:verdict"] == "allowed"
    assert text["sdsecure:policy"] == "default"
    assert text["sdsecure:prompt"] == "a red cube on a table"
    assert text["sdsecure:negative_prompt"] == "blurry"
    assert (text["sdsecure:seed"], text["sdsecure:steps"], text["sdsecure:guidance_scale"]) == ("3", "2", "5.0")
    assert text["sdsecure:lockfile_sha256"] not in ("", "none")
    assert text["sdsecure:backend"] == "max"


def _blocking_lines(report) -> list[str]:
    """How the Python CLI prints each blocking finding (sdsecure.cli.generate.blocked_summary)."""
    return [f"[{f.severity}] {f.rule} in {f.file or '(model)'}" + (f" at {f.where}" if f.where else "")
            + f": {f.message}" for f in report.blocking_findings()]


def _max_compiled_into(cache: Path) -> bool:
    """MAX keeps compiled graphs under MODULAR_CACHE_DIR/.mogg_cache."""
    return any((cache / ".mogg_cache").rglob("*"))


def test_mojo_run_planted_backdoor_exits_before_any_compile(jit_cache: Path, planted: Path, tmp_path: Path):
    from sdsecure.gate import audit

    built_before = bool(_self_builds(jit_cache))
    modular_cache = tmp_path / "modular-cache"
    out = tmp_path / "never.png"
    res = mojo_run("--prompt", "a cat", "--model-id", str(planted), "--output", str(out), cache=jit_cache,
                   MODULAR_CACHE_DIR=str(modular_cache))
    assert res.returncode == 1, res.stdout + res.stderr
    _check_self_build(res, built_before, jit_cache)
    assert "gate: BLOCKED under the default policy" in res.stderr
    assert "Nothing was compiled or run." in res.stderr
    assert "pipeline:" not in res.stdout, "the pipeline was set up for a blocked model"
    assert not out.exists()
    assert not _max_compiled_into(modular_cache), "MAX compiled a graph of a blocked model"

    # The blocking findings are the Python gate's: the planted trigger, with rule, file and node.
    report = audit(str(planted), progress=False).report
    blocking = report.blocking_findings()
    assert any(f.rule.startswith("BACKDOOR") and f.file == TEXT_ENCODER
               and any(n in f.where for n in TRIGGER_NODES) for f in blocking), blocking
    assert not any(f.rule == "LOCK-MISMATCH" for f in blocking), "the lockfile was regenerated: no mismatch"
    # ... printed exactly as the Python CLI prints them for the same model.
    py = _run([sys.executable, str(REPO / "python" / "text_to_image_secure.py"), "--prompt", "a cat",
               "--model-id", str(planted), "--output", str(out)])
    assert py.returncode == 1, py.stdout + py.stderr
    for line in _blocking_lines(report):
        assert line in res.stderr and line in py.stderr, (line, res.stderr, py.stderr)


def test_the_compile_probe_sees_a_max_compile(tmp_path: Path):
    """Control for the test above: MODULAR_CACHE_DIR does receive MAX's compiled graphs."""
    code = ("from max.driver import CPU\nfrom max.engine import InferenceSession\n"
            "from max.graph import DeviceRef, Graph, TensorType, ops\nfrom max.dtype import DType\n"
            "t = TensorType(DType.float32, [2], device=DeviceRef.CPU())\n"
            "with Graph('probe', input_types=[t]) as g:\n    g.output(ops.add(g.inputs[0], g.inputs[0]))\n"
            "InferenceSession(devices=[CPU()]).load(g)\n")
    res = _run([sys.executable, "-c", code], MODULAR_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert _max_compiled_into(tmp_path)


# -- the built binary: Mojo's own argument handling -------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--num-steps", "5"], "--prompt is required"),
    (["--prompt", "   "], "--prompt is required"),
    (["--prompt", "x", "--num-steps", "-3"], "--num-steps must be between 1 and 1000, got -3"),
    (["--prompt", "x", "--num-steps", "1001"], "--num-steps must be between 1 and 1000"),
    (["--prompt", "x", "--num-steps", "ten"], "--num-steps expects an integer, got 'ten'"),
    (["--prompt", "x", "--height", "100"], "--height must be a positive multiple of 64"),
    (["--prompt", "x", "--height", "96"], "--height must be a positive multiple of 64"),
    (["--prompt", "x", "--width=0"], "--width must be a positive multiple of 64"),
    (["--prompt", "x", "--width", "4096"], "--width must be a positive multiple of 64 up to 2048"),
    (["--prompt", "x", "--height", "-8"], "--height must be a positive multiple of 64"),
    (["--prompt", "x", "--seed", "-1"], "--seed must be >= 0"),
    (["--prompt", "x", "--guidance-scale", "nan"], "--guidance-scale must be a number in 0..100"),
    (["--prompt", "x", "--guidance-scale", "-1"], "--guidance-scale must be a number in 0..100"),
    (["--prompt", "x", "--guidance-scale", "inf"], "--guidance-scale must be a number in 0..100"),
    (["--prompt", "x", "--scheduler", "lms"], "--scheduler must be pndm, ddim or euler"),
    (["--prompt", "x", "--backend", "torch"], "--backend must be max or onnxruntime"),
    (["--prompt", "x", "--frobnicate"], "unknown option --frobnicate"),
    (["--prompt", "x", "stray"], "unexpected argument 'stray'"),
    (["--prompt"], "--prompt expects a value"),
    (["--prompt", "--seed", "3"], "--prompt expects a value"),
    (["--prompt", "x", "--strict-security=yes"], "--strict-security takes no value"),
    (["--prompt", "x", "--model-id", ""], "--model-id must not be empty"),
])
def test_bad_arguments_are_one_line_errors(built: Path, args: list[str], message: str):
    res = _run([str(built), *args])
    _one_line_error(res, 2, message)
    assert "gate:" not in res.stdout, "bad arguments must be refused before the gate runs"


def test_equals_form_and_help_anywhere(built: Path):
    res = _run([str(built), "--prompt=x", "--num-steps=0"])
    _one_line_error(res, 2, "--num-steps must be between 1 and 1000, got 0")
    res = _run([str(built), "--num-steps", "0", "-h"])
    assert res.returncode == 0 and res.stdout.startswith("usage:")


def test_unwritable_output_is_refused_before_the_gate(built: Path, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = _run([str(built), "--prompt", "x", "--output", str(blocker / "o.png")])
    _one_line_error(res, 2, "is not a folder")
    assert "gate:" not in res.stdout + res.stderr
    res = _run([str(built), "--prompt", "x", "--output", str(tmp_path / "o.jpg")])
    _one_line_error(res, 2, ".png")


def test_unknown_model_is_a_user_error(built: Path, tmp_path: Path):
    res = _run([str(built), "--prompt", "x", "--model-id", str(tmp_path / "no-such-model"),
                "--output", str(tmp_path / "o.png")])
    _one_line_error(res, 2, "no-such-model")


def test_strict_flag_reaches_the_gate(built: Path, planted: Path, tmp_path: Path):
    res = _run([str(built), "--prompt", "x", "--model-id", str(planted), "--strict-security",
                "--output", str(tmp_path / "o.png")])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "gate: BLOCKED under the strict policy" in res.stderr
