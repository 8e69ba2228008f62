"""text_to_image_secure.py / text_to_image.py: argument errors, verdict output, provenance, blocked models.

Most runs use --backend onnxruntime (no compile); one runs the README's demo path on MAX at 128x128,
the shapes the pipeline and engine tests compile, so it reuses their cached compile.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from PIL import Image
from pipeline_helpers import EMBEDDED_DIR, REPO_ROOT

from sdsecure import gate
from sdsecure.cli import generate

PROMPT = "a photo of an astronaut riding a horse on mars"


def run_cli(argv: list[str], capsys, *, secure: bool = True) -> tuple[int, str, str]:
    rc = (generate.main if secure else generate.main_unverified)(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def no_gate(monkeypatch):
    """Fails the test if the slow part (gate, then compile) is reached."""
    def boom(*args, **kwargs):
        raise AssertionError("the gate was called before the arguments were checked")

    monkeypatch.setattr(gate, "validate", boom)
    monkeypatch.setattr(gate, "load_unverified", boom)


BAD_ARGS = [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "   "], "prompt is empty"),
    ([], "--prompt is required"),
    (["--prompt", PROMPT, "--num-steps", "0"], "number of steps"),
    (["--prompt", PROMPT, "--num-steps", "-2"], "number of steps"),
    (["--prompt", PROMPT, "--num-steps", "ten"], "invalid int value"),
    (["--prompt", PROMPT, "--height", "100"], "height must be a positive multiple of 8"),
    (["--prompt", PROMPT, "--width", "0"], "width must be a positive multiple of 8"),
    (["--prompt", PROMPT, "--width", "96"], "width must be a multiple of 64"),
    (["--prompt", PROMPT, "--scheduler", "lms"], "invalid choice: 'lms'"),
    (["--prompt", PROMPT, "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--prompt", PROMPT, "--guidance-scale", "nan"], "guidance scale"),
    (["--prompt", PROMPT, "--seed", "-1"], "seed"),
    (["--prompt", PROMPT, "--model-id", "./no/such/model"], "no such file or folder"),
    (["--prompt", PROMPT, "--revision", "main"], "--revision applies to Hub models only"),
    (["--prompt", PROMPT, "--skip-validation", "--strict-security"], "contradict"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[" ".join(a) or "no-args" for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, no_gate, args, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "x.png"
    rc, stdout, stderr = run_cli(args + ["--output", str(out)], capsys)
    assert rc == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr       # one line, no traceback
    assert list(tmp_path.iterdir()) == []                      # nothing written, not even the folder


@pytest.mark.parametrize("output, message", [
    ("/proc/self/new/x.png", "not writable"),
    ("{tmp}/file.txt/x.png", "is not a folder"),
    ("{tmp}/x.jpg", "must end in .png"),
])
def test_unwritable_output_exit_2(tmp_path, capsys, no_gate, output, message):
    (tmp_path / "file.txt").write_text("x")
    rc, _, stderr = run_cli(["--prompt", PROMPT, "--output", output.format(tmp=tmp_path)], capsys)
    assert rc == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_json_error(tmp_path, capsys, no_gate):
    rc, stdout, stderr = run_cli(["--prompt", "", "--json", "--output", str(tmp_path / "x.png")], capsys)
    assert rc == 2
    assert json.loads(stdout) == {"status": "error", "error": "the prompt is empty"}


def test_generate_embedded_on_onnxruntime(tmp_path, capsys):
    out = tmp_path / "new" / "astronaut.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--negative-prompt", "blurry", "--num-steps", "3",
                                  "--seed", "0", "--backend", "onnxruntime", "--output", str(out)], capsys)
    assert rc == 0, stderr
    lines = stdout.splitlines()
    verdict = [ln for ln in lines if ln.startswith("gate: ")]
    assert len(verdict) == 1 and verdict[0].startswith("gate: ALLOWED embedded under the default policy: ")
    assert "critical" in verdict[0] and "files hashed" in verdict[0]
    assert "tiny random-weight" in stdout and "--model-id org/name --revision" in stdout
    assert f"image: {out}" in stdout
    with Image.open(out) as im:
        assert im.size == (128, 128)                           # the embedded model's default size
        prov = dict(im.text)
    assert prov["sdsecure:model"] == "embedded"
    assert prov["sdsecure:verdict"] == "allowed" and prov["sdsecure:policy"] == "default"
    assert len(prov["sdsecure:lockfile_sha256"]) == 64
    assert prov["sdsecure:prompt"] == PROMPT and prov["sdsecure:negative_prompt"] == "blurry"
    assert prov["sdsecure:seed"] == "0" and prov["sdsecure:steps"] == "3"
    assert prov["sdsecure:scheduler"] == "PNDMScheduler" and prov["sdsecure:guidance_scale"] == "7.5"
    assert prov["sdsecure:backend"] == "onnxruntime" and prov["sdsecure:engine"].startswith("onnxruntime ")
    assert prov["sdsecure:device"] == "cpu" and prov["sdsecure:entry"] == "text_to_image_secure"
    assert prov["sdsecure:version"]
    assert [p.name for p in out.parent.iterdir()] == ["astronaut.png"]


def test_json_summary(tmp_path, capsys):
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--num-steps", "2", "--backend", "onnxruntime",
                                  "--scheduler", "euler", "--height", "64", "--width", "192", "--json",
                                  "--output", str(out)], capsys)
    assert rc == 0, stderr
    summary = json.loads(stdout)                                # stdout is only the JSON
    assert summary["status"] == "ok" and summary["image"] == str(out)
    assert summary["verdict"] == "allowed" and summary["verified"] is True and summary["model"] == "embedded"
    assert summary["provenance"]["sdsecure:scheduler"] == "EulerDiscreteScheduler"
    assert summary["provenance"]["sdsecure:size"] == "192x64"
    assert "gate: ALLOWED" in stderr
    with Image.open(out) as im:
        assert im.size == (192, 64)


def test_skip_validation_is_loud_and_stamped(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(gate, "validate", lambda *a, **k: called.append(1))
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--num-steps", "2", "--backend", "onnxruntime",
                                  "--skip-validation", "--output", str(out)], capsys)
    assert rc == 0, stderr
    assert not called
    assert "WARNING: --skip-validation" in stderr and "NOT scanned" in stderr
    assert "gate: SKIPPED" in stdout
    with Image.open(out) as im:
        assert im.text["sdsecure:verdict"] == "unverified" and im.text["sdsecure:policy"] == "skipped"
        assert len(im.text["sdsecure:lockfile_sha256"]) == 64     # still hashed


def test_unvalidated_script(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gate, "validate", lambda *a, **k: pytest.fail("text_to_image.py must not validate"))
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--num-steps", "2", "--backend", "onnxruntime",
                                  "--output", str(out)], capsys, secure=False)
    assert rc == 0, stderr
    assert "WITHOUT the sdsecure security gate" in stderr and "text_to_image_secure.py" in stderr
    with Image.open(out) as im:
        assert im.text["sdsecure:verdict"] == "unverified"
        assert im.text["sdsecure:entry"] == "text_to_image"


def _copy_model(tmp_path: Path, *, drop: tuple[str, ...] = ()) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(EMBEDDED_DIR, dst)
    for rel in drop:
        (dst / rel).unlink()
    return dst


def test_model_missing_a_component_exit_2(tmp_path, capsys):
    model = _copy_model(tmp_path, drop=("vae_decoder/model.onnx", "sdsecure.lock.json"))
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--backend", "onnxruntime", "--model-id", str(model),
                                  "--skip-validation", "--output", str(out)], capsys)
    assert rc == 2
    assert "missing vae_decoder/model.onnx" in stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_blocked_model_exit_1_with_findings(tmp_path, capsys):
    """A planted path-traversal external-data reference in the UNet: blocked before anything runs."""
    model = _copy_model(tmp_path, drop=("sdsecure.lock.json",))
    proto = onnx.load(model / "unet" / "model.onnx", load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../../../etc/passwd"
                break
        else:
            continue
        break
    onnx.save(proto, model / "unet" / "model.onnx")
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--backend", "onnxruntime", "--model-id", str(model),
                                  "--json", "--output", str(out)], capsys)
    assert rc == 1
    assert "gate: BLOCKED under the default policy" in stderr
    assert "[critical]" in stderr and "unet/model.onnx" in stderr
    summary = json.loads(stdout)
    assert summary["status"] == "blocked" and summary["blocking"]
    first = summary["blocking"][0]
    assert {"rule", "file", "where", "message", "severity"} <= set(first)
    assert any(f["file"] == "unet/model.onnx" for f in summary["blocking"])
    assert not out.exists()


def test_list_safe_models(capsys, no_gate):
    rc, stdout, _ = run_cli(["--list-safe-models"], capsys)
    assert rc == 0
    for name in ("embedded", "runwayml/stable-diffusion-v1-5 @ onnx", "modularai/stable-diffusion-1.5-onnx",
                 "onnx-community/stable-diffusion-v1-5-ONNX"):
        assert name in stdout
    assert "not verified by us offline" in stdout and "PAIT-ONNX-200" in stdout
    rc, stdout, _ = run_cli(["--list-safe-models", "--json"], capsys)
    models = json.loads(stdout)["models"]
    assert [m for m in models if m["verified_by_us"]] == [m for m in models if m["model_id"] == "embedded"]


def test_scripts_run_as_files(tmp_path):
    """The thin entry points work as `python python/<script>.py` from any folder."""
    for script in ("text_to_image_secure.py", "text_to_image.py"):
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "python" / script), "--prompt", "",
                               "--output", str(tmp_path / "x.png")],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().endswith("the prompt is empty")
    assert list(tmp_path.iterdir()) == []


def test_demo_on_max(tmp_path, capsys):
    """The README's demo path: embedded model, gate, MAX (128x128: compile shared with the other tests)."""
    out = tmp_path / "out" / "demo.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--num-steps", "3", "--output", str(out)], capsys)
    assert rc == 0, stderr
    assert "gate: ALLOWED" in stdout and f"image: {out}" in stdout and "max on cpu" in stdout
    with Image.open(out) as im:
        assert im.text["sdsecure:backend"] == "max" and im.text["sdsecure:engine"].startswith("MAX ")


def test_explicit_lockfile_mismatch_blocks_and_writes_nothing(tmp_path, capsys):
    """--lockfile: a lockfile whose hash for the UNet weights differs blocks the run (exit 1)."""
    lock = json.loads((EMBEDDED_DIR / "sdsecure.lock.json").read_text())
    lock["files"]["unet/weights.pb"]["sha256"] = "0" * 64
    (tmp_path / "pinned.lock.json").write_text(json.dumps(lock))
    out = tmp_path / "x.png"
    rc, _, stderr = run_cli(["--prompt", PROMPT, "--backend", "onnxruntime", "--lockfile",
                             str(tmp_path / "pinned.lock.json"), "--output", str(out)], capsys)
    assert rc == 1
    assert "unet/weights.pb" in stderr and "[critical]" in stderr
    assert not out.exists()


def test_explicit_lockfile_that_matches_is_reported_verified(tmp_path, capsys):
    shutil.copy(EMBEDDED_DIR / "sdsecure.lock.json", tmp_path / "pinned.lock.json")
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--backend", "onnxruntime", "--num-steps", "2", "--lockfile",
                                  str(tmp_path / "pinned.lock.json"), "--output", str(out)], capsys)
    assert rc == 0, stderr
    assert "lockfile verified" in stdout
    assert out.exists()


def test_missing_lockfile_is_a_user_error(tmp_path, capsys):
    rc, _, stderr = run_cli(["--prompt", PROMPT, "--backend", "onnxruntime", "--lockfile",
                             str(tmp_path / "nope.json"), "--output", str(tmp_path / "x.png")], capsys)
    assert rc == 2 and "nope.json" in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.png").exists()


def test_console_script_names_itself_in_errors(capsys, monkeypatch, no_gate):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sdsecure-generate"])
    rc, _, stderr = run_cli(["--prompt", ""], capsys)
    assert rc == 2 and stderr.strip().splitlines()[-1].startswith("sdsecure-generate: ")
    monkeypatch.setattr(sys, "argv", ["python/text_to_image_secure.py"])
    rc, _, stderr = run_cli(["--prompt", ""], capsys)
    assert stderr.strip().splitlines()[-1].startswith("text_to_image_secure.py: ")


@pytest.fixture
def restored_logging():
    """setup_logging changes process-wide logging: put it back afterwards."""
    import logging

    root, progress = logging.getLogger(), logging.getLogger("sdsecure.progress")
    saved = (root.level, list(root.handlers), progress.level, list(progress.handlers), progress.propagate)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    progress.setLevel(saved[2])
    progress.handlers[:] = saved[3]
    progress.propagate = saved[4]


@pytest.mark.parametrize("verbose, quiet, shown", [(0, False, True), (1, False, True), (0, True, False)])
def test_progress_on_long_work_is_shown_once_on_stderr_unless_quiet(capsys, restored_logging, verbose, quiet, shown):
    import logging

    from sdsecure.cli.common import setup_logging

    setup_logging(verbose, quiet=quiet)
    logging.getLogger("sdsecure.progress").info("compiling unet piece 1/3 with MAX")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("sdsecure: compiling unet piece 1/3 with MAX\n" if shown else "")


def test_progress_goes_to_the_stderr_of_the_moment(restored_logging, monkeypatch):
    """Not to the stream that was sys.stderr when logging was set up (a closed capture, a GUI's)."""
    import io
    import logging

    from sdsecure.cli.common import show_progress

    show_progress()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("sdsecure.progress").info("unet piece 1/3 compiled in 250 s")
    assert later.getvalue() == "sdsecure: unet piece 1/3 compiled in 250 s\n"


def test_a_long_compile_is_announced_on_stderr_without_verbose(tmp_path, capsys, monkeypatch, restored_logging):
    """The CLI shows the engine's progress log by default: each graph whose compile outlasts the notice
    delay (0 s here, so that MAX's cached compile of the embedded model counts) is announced and timed."""
    from sdsecure.engine import runtime

    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 0.0)
    runtime.clear_memory_cache()
    out = tmp_path / "demo.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--num-steps", "2", "--output", str(out)], capsys)
    assert rc == 0, stderr
    for graph in ("text_encoder", "unet", "vae_decoder"):
        assert f"sdsecure: compiling {graph} with MAX: a cold compile takes minutes" in stderr, stderr
        assert re.search(rf"^sdsecure: {graph} compiled in \d+ s$", stderr, re.M), stderr
    assert "compiling" not in stdout


def test_too_few_steps_for_the_scheduler_fail_before_any_compile(tmp_path, capsys, monkeypatch):
    """PNDM needs 2 steps: said in one line (exit 2) before the graphs are prepared or compiled, not after
    minutes of compiling; nothing is written."""
    import sdsecure.engine

    def no_engine(*_a, **_k):
        raise AssertionError("the engine was reached")

    monkeypatch.setattr(sdsecure.engine, "prepare", no_engine)
    monkeypatch.setattr(sdsecure.engine, "create_session", no_engine)
    out = tmp_path / "one.png"
    rc, stdout, stderr = run_cli(["--prompt", PROMPT, "--num-steps", "1", "--output", str(out)], capsys)
    assert rc == 2
    assert "PNDM (PLMS) needs at least 2 steps" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
