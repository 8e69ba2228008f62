"""Safe walking of a snapshot (gate/files.py): every FILE-* rule with a malicious and a benign case."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from sdsecure.errors import UserError
from sdsecure.gate import files as gf
from sdsecure.gate.blob import IN_MEMORY_LIMIT
from sdsecure.gate.files import HashProgress, Limits, safe_relpath, walk_snapshot
from sdsecure.gate.report import Severity
from sdsecure.gate.rules import RULES


def write(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def rules_of(res) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in res.findings:
        out.setdefault(f.rule, []).append(f)
    return out


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    write(root / "model_index.json", b'{"_class_name": "x"}')
    write(root / "unet" / "model.onnx", b"onnx-bytes")
    write(root / "unet" / "weights.pb", os.urandom(4096))
    return root


def test_every_file_rule_is_declared():
    for rule in ("FILE-SYMLINK-ESCAPE", "FILE-SYMLINK-DANGLING", "FILE-SYMLINK-DIR", "FILE-HARDLINK-ESCAPE",
                 "FILE-HARDLINK", "FILE-SPECIAL", "FILE-TOO-LARGE", "FILE-TOTAL-TOO-LARGE", "FILE-TOO-MANY",
                 "FILE-BAD-NAME", "FILE-UNREADABLE"):
        assert rule in RULES, rule


def test_benign_folder_reads_every_file_once_with_hashes(model: Path):
    res = walk_snapshot(model, progress=False)
    assert res.findings == []
    assert sorted(res.files) == ["model_index.json", "unet/model.onnx", "unet/weights.pb"]
    for rel, blob in res.files.items():
        data = (model / rel).read_bytes()
        assert blob.bytes() == data
        assert blob.sha256 == hashlib.sha256(data).hexdigest()
        assert blob.size == len(data)


def test_root_given_through_a_symlink_is_fine(model: Path, tmp_path: Path):
    alias = tmp_path / "alias"
    alias.symlink_to(model)
    res = walk_snapshot(alias, progress=False)
    assert res.findings == [] and len(res.files) == 3


def test_missing_root_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="cannot open model folder"):
        walk_snapshot(tmp_path / "nope", progress=False)


# -- symlinks ---------------------------------------------------------------------------------------

def test_symlink_escaping_the_folder_is_rejected_and_not_read(model: Path, tmp_path: Path):
    secret = write(tmp_path / "secret.txt", b"TOP SECRET")
    (model / "unet" / "extra.pb").symlink_to(secret)                 # absolute target
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "vocab.json").symlink_to("../../secret.txt")  # relative escape
    res = walk_snapshot(model, progress=False)
    found = rules_of(res)["FILE-SYMLINK-ESCAPE"]
    assert {f.file for f in found} == {"unet/extra.pb", "tokenizer/vocab.json"}
    assert all(f.severity == Severity.CRITICAL for f in found)
    assert "unet/extra.pb" not in res.files and "tokenizer/vocab.json" not in res.files
    assert all(b.bytes() != b"TOP SECRET" for b in res.files.values())


def test_symlink_inside_the_folder_is_followed_and_read_once(model: Path):
    (model / "alias.pb").symlink_to("unet/weights.pb")
    res = walk_snapshot(model, progress=False)
    assert res.findings == []
    assert res.files["alias.pb"] is res.files["unet/weights.pb"]


def test_symlink_chain_through_outside_is_rejected(model: Path, tmp_path: Path):
    # inside -> outside -> inside: realpath ends inside, but the outside hop could change any time;
    # we open by components with O_NOFOLLOW beneath the root, so the final read is still contained.
    hop = tmp_path / "hop.pb"
    hop.symlink_to(model / "unet" / "weights.pb")
    (model / "via.pb").symlink_to(hop)
    res = walk_snapshot(model, progress=False)
    assert res.files["via.pb"].bytes() == (model / "unet" / "weights.pb").read_bytes()
    # and if the hop is re-pointed outside, the link is rejected
    hop.unlink()
    hop.symlink_to(write(tmp_path / "evil.bin", b"evil"))
    res = walk_snapshot(model, progress=False)
    assert "via.pb" not in res.files
    assert [f.file for f in rules_of(res)["FILE-SYMLINK-ESCAPE"]] == ["via.pb"]


def test_dangling_symlink_is_reported(model: Path):
    (model / "gone.onnx").symlink_to("does-not-exist.onnx")
    res = walk_snapshot(model, progress=False)
    assert [f.file for f in rules_of(res)["FILE-SYMLINK-DANGLING"]] == ["gone.onnx"]
    assert "gone.onnx" not in res.files


def test_symlink_loop_is_reported_not_followed(model: Path):
    (model / "a.pb").symlink_to("b.pb")
    (model / "b.pb").symlink_to("a.pb")
    res = walk_snapshot(model, progress=False)
    assert {f.file for f in rules_of(res)["FILE-SYMLINK-DANGLING"]} == {"a.pb", "b.pb"}
    assert len(res.files) == 3


def test_directory_symlink_is_not_followed(model: Path):
    (model / "unet2").symlink_to("unet", target_is_directory=True)
    res = walk_snapshot(model, progress=False)
    assert [f.file for f in rules_of(res)["FILE-SYMLINK-DIR"]] == ["unet2"]
    assert not any(p.startswith("unet2/") for p in res.files)


def _hf_cache(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "hub" / "models--org--name"
    sha = "a" * 40
    snap = repo / "snapshots" / sha
    blobs = repo / "blobs"
    b1 = write(blobs / ("1" * 64), b"unet weights")
    b2 = write(blobs / ("2" * 40), b'{"a": 1}')
    (snap / "unet").mkdir(parents=True)
    (snap / "unet" / "weights.pb").symlink_to(os.path.relpath(b1, snap / "unet"))
    (snap / "model_index.json").symlink_to(os.path.relpath(b2, snap))
    write(repo / "refs" / "main", sha.encode())
    return repo, snap


def test_hf_cache_symlinks_into_blobs_are_accepted(tmp_path: Path):
    repo, snap = _hf_cache(tmp_path)
    assert gf.hf_blob_dirs(Path(os.path.realpath(snap))) == [Path(os.path.realpath(repo / "blobs"))]
    res = walk_snapshot(snap, progress=False)
    assert res.findings == []
    assert res.files["unet/weights.pb"].bytes() == b"unet weights"
    assert res.files["model_index.json"].bytes() == b'{"a": 1}'


def test_hf_cache_symlinks_elsewhere_in_the_cache_are_rejected(tmp_path: Path):
    repo, snap = _hf_cache(tmp_path)
    other = write(tmp_path / "hub" / "models--evil--repo" / "blobs" / ("3" * 64), b"other repo")
    (snap / "a.pb").symlink_to(os.path.relpath(other, snap))
    (snap / "b.txt").symlink_to("../../refs/main")        # inside the repo folder, but not a blob
    res = walk_snapshot(snap, progress=False)
    assert {f.file for f in rules_of(res)["FILE-SYMLINK-ESCAPE"]} == {"a.pb", "b.txt"}
    assert "a.pb" not in res.files and "b.txt" not in res.files


def test_blob_dirs_are_only_granted_for_the_hf_layout(tmp_path: Path):
    fake = tmp_path / "snapshots" / "x"          # parent is "snapshots" but no models-- folder
    fake.mkdir(parents=True)
    assert gf.hf_blob_dirs(fake) == []


# -- special files, hard links --------------------------------------------------------------------

def test_fifo_is_rejected_without_hanging(model: Path):
    os.mkfifo(model / "unet" / "weights2.pb")
    res = walk_snapshot(model, progress=False)
    f = rules_of(res)["FILE-SPECIAL"]
    assert [x.file for x in f] == ["unet/weights2.pb"] and f[0].evidence["kind"] == "FIFO"
    assert f[0].severity == Severity.CRITICAL


def test_socket_and_device_are_rejected(model: Path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(model / "s.sock"))
    expected = {"s.sock"}
    try:
        os.mknod(model / "zero.pb", 0o600 | stat.S_IFCHR, os.makedev(1, 5))   # /dev/zero: endless
        expected.add("zero.pb")
    except PermissionError:
        pass  # not root: the FIFO and socket cases still cover the rule
    try:
        res = walk_snapshot(model, progress=False)
    finally:
        sock.close()
    assert {f.file for f in rules_of(res)["FILE-SPECIAL"]} == expected
    assert not expected & set(res.files)


def test_symlink_to_a_fifo_inside_is_rejected(model: Path):
    os.mkfifo(model / "pipe")
    (model / "link.pb").symlink_to("pipe")
    res = walk_snapshot(model, progress=False)
    assert {f.file for f in rules_of(res)["FILE-SPECIAL"]} == {"pipe", "link.pb"}


def test_hardlink_to_a_file_outside_is_rejected(model: Path, tmp_path: Path):
    secret = write(tmp_path / "id_rsa", b"PRIVATE KEY")
    os.link(secret, model / "unet" / "extra.pb")
    res = walk_snapshot(model, progress=False)
    f = rules_of(res)["FILE-HARDLINK-ESCAPE"]
    assert [x.file for x in f] == ["unet/extra.pb"] and f[0].severity == Severity.CRITICAL
    assert "unet/extra.pb" not in res.files


def test_hardlinks_inside_are_explained_and_read_once(model: Path):
    os.link(model / "unet" / "weights.pb", model / "copy.pb")
    res = walk_snapshot(model, progress=False)
    assert [f.rule for f in res.findings] == ["FILE-HARDLINK"]
    assert res.findings[0].severity == Severity.INFO
    assert res.files["copy.pb"] is res.files["unet/weights.pb"]


# -- caps and names ----------------------------------------------------------------------------------

def test_file_above_cap_is_not_read(model: Path):
    res = walk_snapshot(model, progress=False, limits=Limits(max_file_bytes=1000))
    f = rules_of(res)["FILE-TOO-LARGE"]
    assert [x.file for x in f] == ["unet/weights.pb"] and f[0].severity == Severity.HIGH
    assert "unet/weights.pb" not in res.files and "unet/model.onnx" in res.files


def test_files_under_the_caps_pass(model: Path):
    res = walk_snapshot(model, progress=False, limits=Limits(max_file_bytes=4096, max_total_bytes=4096 + 30,
                                                             max_files=4, max_depth=1))
    assert res.findings == [] and len(res.files) == 3


def test_total_cap_stops_reading(model: Path):
    res = walk_snapshot(model, progress=False, limits=Limits(max_total_bytes=100))
    assert len(rules_of(res)["FILE-TOTAL-TOO-LARGE"]) == 1
    assert res.total_bytes <= 100
    assert "unet/weights.pb" not in res.files


def test_too_many_files_and_too_deep(tmp_path: Path):
    root = tmp_path / "m"
    for i in range(10):
        write(root / f"f{i}.json", b"{}")
    res = walk_snapshot(root, progress=False, limits=Limits(max_files=5))
    assert len(rules_of(res)["FILE-TOO-MANY"]) == 1 and len(res.files) == 5
    deep = tmp_path / "d"
    write(deep / "a" / "b" / "c" / "x.json", b"{}")
    res = walk_snapshot(deep, progress=False, limits=Limits(max_depth=2))
    assert len(rules_of(res)["FILE-TOO-MANY"]) == 1 and res.files == {}


def test_limits_from_env(monkeypatch):
    monkeypatch.setenv("SDSECURE_MAX_FILE_BYTES", "123")
    assert Limits.from_env().max_file_bytes == 123
    monkeypatch.setenv("SDSECURE_MAX_FILE_BYTES", "lots")
    with pytest.raises(UserError, match="SDSECURE_MAX_FILE_BYTES"):
        Limits.from_env()


def test_odd_names_are_rejected(tmp_path: Path):
    root = tmp_path / "m"
    root.mkdir()
    write(root / "unet\\model.onnx", b"x")          # a backslash: a path on Windows
    write(root / "a\x1bb.json", b"x")               # an escape character
    with open(os.path.join(os.fsencode(root), b"caf\xe9.onnx"), "wb") as f:   # not UTF-8
        f.write(b"x")
    write(root / "modèle.json", b"{}")              # plain UTF-8: fine
    res = walk_snapshot(root, progress=False)
    assert len(rules_of(res)["FILE-BAD-NAME"]) == 3
    assert list(res.files) == ["modèle.json"]


def test_file_replaced_after_listing_is_refused(model: Path):
    # Simulate a concurrent writer: list, then swap the file, then read.
    real = Path(os.path.realpath(model))
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries, names = gf._list(fd, real, [real], None, None, Limits(), [])
        write(model / "unet" / "model.onnx.new", b"swapped in")
        os.replace(model / "unet" / "model.onnx.new", model / "unet" / "model.onnx")
        (model / "model_index.json").unlink()
        (model / "model_index.json").symlink_to("unet/weights.pb")
        res = gf.WalkResult(real)
        gf._read_entries(entries, names, [fd], Limits(), False, res)
    finally:
        os.close(fd)
    bad = {f.file for f in rules_of(res)["FILE-UNREADABLE"]}
    assert bad == {"unet/model.onnx", "model_index.json"}
    assert set(res.files) == {"unet/weights.pb"}


def test_only_reads_the_named_files_and_prunes_the_walk(tmp_path: Path):
    root = tmp_path / "downloads"
    write(root / "model.onnx", b"m")
    write(root / "weights" / "w.bin", b"w")
    for i in range(50):
        write(root / "unrelated" / f"{i}.txt", b"u")
    res = walk_snapshot(root, only=["model.onnx", "weights/w.bin"], progress=False, limits=Limits(max_files=10))
    assert res.findings == [] and sorted(res.files) == ["model.onnx", "weights/w.bin"]


def test_include_filter(model: Path):
    res = walk_snapshot(model, include=lambda p: p.endswith(".json"), progress=False)
    assert list(res.files) == ["model_index.json"]


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "C:/x", "a\\b", "", ".", "a\nb"])
def test_safe_relpath_rejects(bad):
    with pytest.raises(ValueError):
        safe_relpath(bad)


@pytest.mark.parametrize("good,norm", [("a/b.onnx", "a/b.onnx"), ("./a//b", "a/b"), ("weights.pb", "weights.pb")])
def test_safe_relpath_accepts(good, norm):
    assert safe_relpath(good) == norm


# -- large files --------------------------------------------------------------------------------------

def test_large_file_goes_through_a_sealed_memfd_and_hash_matches(tmp_path: Path):
    root = tmp_path / "big"
    root.mkdir()
    path = root / "weights.pb"
    size = IN_MEMORY_LIMIT + (3 << 20) + 123          # not a multiple of the window
    with open(path, "wb") as f:
        f.truncate(size)                              # sparse: fast to create
        f.seek(size - 5)
        f.write(b"tail!")
        f.seek(1 << 20)
        f.write(b"head")
    res = walk_snapshot(root, progress=False)
    blob = res.files["weights.pb"]
    assert blob.size == size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    assert blob.sha256 == h.hexdigest()
    assert bytes(blob.view()[-5:]) == b"tail!"
    blob.release()                                     # drops resident pages, keeps the bytes
    assert hashlib.sha256(blob.view()).hexdigest() == blob.sha256
    with pytest.raises(TypeError):
        blob.view()[0] = 1                             # read-only
    import fcntl  # the memfd is sealed against writes: changing the file changes nothing
    path.write_bytes(b"changed")
    assert bytes(blob.view()[-5:]) == b"tail!" and fcntl  # noqa: B018


def test_progress_summary_line():
    out = io.StringIO()
    bar = HashProgress(200 << 20, True, stream=out)
    bar.update(200 << 20)
    bar.finish(3)
    assert "read and hashed 3 files" in out.getvalue()
    quiet = io.StringIO()
    small = HashProgress(1000, True, stream=quiet)     # small models: no noise
    small.update(1000)
    small.finish(1)
    assert quiet.getvalue() == ""


def test_live_progress_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = HashProgress(1 << 30, True, stream=out)
    bar.update(1 << 30)
    bar.finish(2)
    text = out.getvalue()
    assert "\rsdsecure: hashing 1.07/1.07 GB (100%" in text and text.endswith("GB/s)\n")


def _large_folder(tmp_path: Path, monkeypatch, n: int = 4) -> dict[str, bytes]:
    """n files above the (lowered) in-memory limit, and one small file."""
    monkeypatch.setattr(gf, "IN_MEMORY_LIMIT", 1 << 20)
    data = {f"big{k}.bin": os.urandom((2 << 20) + k) for k in range(n)}
    data["config.json"] = b"{}"
    for name, content in data.items():
        write(tmp_path / "m" / name, content)
    return data


def test_large_files_are_hashed_two_at_a_time_each_once(tmp_path: Path, monkeypatch):
    data = _large_folder(tmp_path, monkeypatch)
    seen: list[tuple[str, str]] = []
    real = gf._read_one

    def recording(e, *args):
        seen.append((e.rel, threading.current_thread().name))
        time.sleep(0.05)           # long enough for the other reader to start
        return real(e, *args)
    monkeypatch.setattr(gf, "_read_one", recording)
    res = walk_snapshot(tmp_path / "m", defer_large=True, progress=False)
    assert res.finish() == []
    assert {rel: b.sha256 for rel, b in res.files.items()} == {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    large = [(rel, thread) for rel, thread in seen if rel.startswith("big")]
    assert sorted(rel for rel, _ in large) == [f"big{k}.bin" for k in range(4)]
    assert len({thread for _, thread in large}) == gf.READ_THREADS == 2


def test_a_reader_that_breaks_fails_every_large_file_left_and_says_so(tmp_path: Path, monkeypatch):
    _large_folder(tmp_path, monkeypatch)
    real = gf._read_one

    def breaking(e, *args):
        if e.rel == "big1.bin":
            raise RuntimeError("disk on fire")
        return real(e, *args)
    monkeypatch.setattr(gf, "_read_one", breaking)
    res = walk_snapshot(tmp_path / "m", defer_large=True, progress=False)
    late = res.finish()
    assert [(f.rule, f.severity) for f in late] == [("FILE-UNREADABLE", Severity.HIGH)]
    assert "disk on fire" in late[0].message
    assert "big1.bin" not in res.files and "config.json" in res.files
    assert all(b.wait() for b in res.files.values())      # nothing left pending, nothing hangs
