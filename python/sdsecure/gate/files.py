"""Safe walking of a model snapshot: every byte read stays inside it and is read exactly once.

`walk_snapshot(root)` returns {relative path: Blob} and the FILE-* findings. Rules:
- Everything read lies inside the snapshot root. A symlink is followed only when its target is
  inside the root, or, for a Hugging Face cache snapshot (`.../models--org--name/snapshots/<sha>`),
  inside that repo's `blobs/` folder or the cache-wide shared blob store (the Hub cache stores
  snapshot files as symlinks into `../../blobs/`). Every other symlink is reported and not read.
- Files are opened component by component with O_NOFOLLOW from directory descriptors, and the
  descriptor is fstat-ed: a file swapped for a symlink or a special file after listing is refused.
- Device files, FIFOs and sockets are refused (reading them can hang or never end).
- A file with more names (hard links) than the snapshot holds has a name outside it: refused.
- Size caps per file, in total, and on the number of files; names must be plain relative paths.
- The same inode reached twice (hard link, internal symlink) is read once and shared.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from sdsecure.errors import UserError
from sdsecure.gate.blob import IN_MEMORY_LIMIT, Blob, read_blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import declare

log = logging.getLogger(__name__)

GiB = 1 << 30

declare("FILE-SYMLINK-ESCAPE", Severity.CRITICAL, "Symlink leaves the model folder",
        "A symlink whose target lies outside the snapshot makes the gate (and anything after it) read "
        "files the model author chose on your machine, e.g. ~/.ssh keys handed on as 'weights'.",
        "Replace the symlink by the file itself. Symlinks are only accepted inside the snapshot and, "
        "in the Hugging Face cache, into the repo's own blobs folder.")
declare("FILE-SYMLINK-DANGLING", Severity.MEDIUM, "Symlink with no target",
        "A dangling symlink is a broken or tampered snapshot; the file it names is missing.",
        "Download the model again (or restore the missing file).")
declare("FILE-SYMLINK-DIR", Severity.MEDIUM, "Symlink to a directory",
        "Directory symlinks can create loops or make the same files appear under other names; "
        "they are not followed.",
        "Replace the directory symlink by a real directory.")
declare("FILE-HARDLINK-ESCAPE", Severity.CRITICAL, "Hard link to a file outside the model folder",
        "The file has more names than the snapshot contains, so one of its names lies outside it: an "
        "archive can plant a hard link to a private file (CVE-2026-34447-style external-data reads).",
        "Replace the hard link by a copy of the intended file.")
declare("FILE-HARDLINK", Severity.INFO, "Hard link inside the model folder",
        "The same file appears under several names inside the snapshot; it is read once.",
        "Nothing to do, unless the duplication is unexpected.")
declare("FILE-SPECIAL", Severity.CRITICAL, "Device file, FIFO or socket in the model folder",
        "Reading a FIFO blocks forever; a device file can be endless (/dev/zero) or secret (a disk). "
        "A model has no reason to ship one.",
        "Remove the special file; model files are regular files.")
declare("FILE-TOO-LARGE", Severity.HIGH, "File above the size cap",
        "An oversized file exhausts memory or disk while it is read and hashed; it is not read.",
        "Raise the cap (SDSECURE_MAX_FILE_BYTES) if the file is legitimately that large.")
declare("FILE-TOTAL-TOO-LARGE", Severity.HIGH, "Model above the total size cap",
        "The snapshot is larger than the total cap; the remaining files are not read.",
        "Raise the cap (SDSECURE_MAX_TOTAL_BYTES) if the model is legitimately that large.")
declare("FILE-TOO-MANY", Severity.HIGH, "Too many files or folders too deep",
        "Millions of tiny files or deep folder trees are a denial-of-service shape, not a model.",
        "Raise SDSECURE_MAX_FILES / SDSECURE_MAX_DEPTH if the layout is legitimate.")
declare("FILE-BAD-NAME", Severity.MEDIUM, "File name that is not a plain relative path",
        "Names with backslashes, control characters or bytes that are not UTF-8 are interpreted "
        "differently by different tools (a classic way to hide a file); the file is not read.",
        "Rename the file with a plain name.")
declare("FILE-UNREADABLE", Severity.HIGH, "File that cannot be read safely",
        "The file disappeared, changed while it was read, or could not be opened without following a "
        "link: what would run is unknown.",
        "Check the folder for concurrent writers and download the model again.")


@dataclass(frozen=True)
class Limits:
    """Caps of a walk. Defaults fit SD-XL-sized repos; override with SDSECURE_MAX_* variables."""

    max_file_bytes: int = 16 * GiB
    max_total_bytes: int = 48 * GiB
    max_files: int = 10_000
    max_depth: int = 32

    @classmethod
    def from_env(cls) -> "Limits":
        kw = {}
        for f, env in (("max_file_bytes", "SDSECURE_MAX_FILE_BYTES"), ("max_total_bytes", "SDSECURE_MAX_TOTAL_BYTES"),
                       ("max_files", "SDSECURE_MAX_FILES"), ("max_depth", "SDSECURE_MAX_DEPTH")):
            val = os.environ.get(env)
            if val:
                try:
                    kw[f] = int(val)
                except ValueError:
                    raise UserError(f"{env}={val!r} is not an integer") from None
        return cls(**kw)


@dataclass
class WalkResult:
    root: Path
    files: dict[str, Blob] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    _background: "threading.Thread | None" = None
    _late: list[Finding] = field(default_factory=list)
    _progress: tuple | None = None

    def finish(self) -> list[Finding]:
        """Wait for the deferred reads (walk_snapshot(defer_large=True)); drop the files that could
        not be read and return the findings that say why (also added to `findings`)."""
        if self._background is not None:
            self._background.join()
            self._background = None
            failed = {id(b) for b in self.files.values() if not b.wait()}
            for rel in [r for r, b in self.files.items() if id(b) in failed]:
                del self.files[rel]
            self.findings += self._late
        late, self._late = self._late, []
        return late

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.files.values())


# -- names ------------------------------------------------------------------------------------------

def safe_relpath(path: str) -> str:
    """Normalise a relative "/"-separated path from untrusted data (lockfile, config, external-data
    location). Raises ValueError for absolute paths, `..`, backslashes, drive letters, empty names or
    control characters."""
    if not isinstance(path, str) or not path:
        raise ValueError("empty path")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise ValueError(f"control character in path {path!r}")
    if "\\" in path:
        raise ValueError(f"backslash in path {path!r}")
    if path.startswith("/") or (len(path) >= 2 and path[1] == ":"):
        raise ValueError(f"absolute path {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"empty path {path!r}")
    if ".." in parts:
        raise ValueError(f"path {path!r} leaves its folder ('..')")
    return "/".join(parts)


def _name_ok(name: str) -> bool:
    try:
        name.encode("utf-8")            # surrogate-escaped bytes (non UTF-8 names) fail here
    except UnicodeEncodeError:
        return False
    return "\\" not in name and not any(ord(c) < 32 or c == "\x7f" for c in name)


# -- Hugging Face cache layout ----------------------------------------------------------------------

def hf_blob_dirs(root: Path) -> list[Path]:
    """The folders a Hub cache snapshot may link into: `<repo>/blobs` and the cache-wide shared
    store `<cache>/blobs`. Empty when `root` is not `<cache>/models--org--name/snapshots/<sha>`."""
    if root.parent.name != "snapshots":
        return []
    repo_dir = root.parent.parent
    if not repo_dir.name.startswith(("models--", "datasets--", "spaces--", "kernels--")):
        return []
    out = [repo_dir / "blobs"]
    shared = repo_dir.parent / "blobs"
    if shared.is_dir():
        out.append(shared)
    return [p for p in out if p.is_dir()]


# -- progress -------------------------------------------------------------------------------------

class HashProgress:
    """A one-line progress display on stderr for large snapshots (live when stderr is a terminal,
    a final summary line otherwise)."""

    LIVE_THRESHOLD = 256 << 20          # show progress when there is at least this much to read
    SUMMARY_THRESHOLD = 64 << 20

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total >= self.SUMMARY_THRESHOLD
        self.live = self.enabled and total >= self.LIVE_THRESHOLD and _isatty(self.stream)
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:                # large files are hashed on several threads
            self.done += n
        if not self.live:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        rate = self.done / max(now - self.t0, 1e-6)
        self.stream.write(f"\rsdsecure: hashing {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                          f"({100 * self.done / max(self.total, 1):.0f}%, {rate / 1e9:.2f} GB/s)   ")
        self.stream.flush()

    def finish(self, nfiles: int) -> None:
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        self.stream.write(("\r" if self.live else "") + f"sdsecure: read and hashed {nfiles} files, "
                          f"{self.done / 1e9:.2f} GB in {dt:.1f} s ({self.done / 1e9 / max(dt, 1e-6):.2f} GB/s)\n")
        self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- the walk -------------------------------------------------------------------------------------

READ_THREADS = 2          # large files read and hashed at once (sha256 keeps one core busy per file)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0) | os.O_NONBLOCK


@dataclass
class _Entry:
    rel: str                   # name inside the snapshot
    area: int                  # index into the allowed areas (0 = snapshot root)
    parts: tuple[str, ...]     # components below that area's root
    st: os.stat_result         # lstat of the final file
    via_symlink: bool


def _finding(rule: str, sev: Severity, rel: str, message: str, **evidence) -> Finding:
    return Finding(rule, sev, rel, "", message, evidence)


def walk_snapshot(root: str | os.PathLike, *, include: Callable[[str], bool] | None = None,
                  only: Iterable[str] | None = None, limits: Limits | None = None, progress: bool = True,
                  blob_dirs: Iterable[str | os.PathLike] | None = None, defer_large: bool = False) -> WalkResult:
    """Read every regular file below `root` once. `include(relpath)` restricts which files are read
    (e.g. a Hub download's allow patterns); `only` names the exact relative paths to read (the walk
    then descends only into their folders: a single model file in a big folder); `blob_dirs`
    (default: detected from the HF cache layout) are the extra folders symlinks may point into.

    `defer_large`: files above blob.IN_MEMORY_LIMIT are read by background threads, READ_THREADS at a time (ONNX files
    first) into deferred blobs, so the caller can analyse the small files meanwhile; call
    `result.finish()` before trusting `files` and `findings`. Without it, everything is read here."""
    if only is not None:
        wanted = {safe_relpath(p) for p in only}
        dirs = {"/".join(p.split("/")[:i]) for p in wanted for i in range(1, p.count("/") + 1)}
        prev = include
        include = lambda rel: rel in wanted and (prev is None or prev(rel))  # noqa: E731
        descend = lambda rel: rel in dirs  # noqa: E731
    else:
        descend = None
    limits = limits or Limits.from_env()
    t0 = time.perf_counter()
    try:
        real_root = Path(os.path.realpath(root))
        root_fd = os.open(real_root, _O_DIR)
    except OSError as exc:
        raise UserError(f"cannot open model folder {str(root)!r}: {exc.strerror or exc}") from None
    result = WalkResult(real_root)
    areas = [real_root] + [Path(os.path.realpath(p)) for p in (blob_dirs if blob_dirs is not None
                                                                 else hf_blob_dirs(real_root))]
    area_fds = [root_fd]
    try:
        for a in areas[1:]:
            area_fds.append(os.open(a, _O_DIR))
        entries, names_inside = _list(root_fd, real_root, areas, include, descend, limits, result.findings)
        deferred = _read_entries(entries, names_inside, area_fds, limits, progress, result, defer_large)
    except BaseException:
        for fd in area_fds:
            os.close(fd)
        raise
    if not deferred:
        for fd in area_fds:
            os.close(fd)
        result.seconds = time.perf_counter() - t0
        return result

    # sha256 runs on one core per file: the large files are read and hashed READ_THREADS at a time,
    # each taking the next one in order (ONNX graphs first), so the biggest does not hold up the rest
    pending = list(deferred)
    pending_lock = threading.Lock()

    def take() -> tuple[_Entry, Blob] | None:
        with pending_lock:
            return pending.pop(0) if pending else None

    def reader() -> None:
        item = None
        try:
            while (item := take()) is not None:
                e, blob = item
                got = _read_one(e, area_fds, bar_update, result._late)
                if got is None:
                    blob._fail(OSError(f"{e.rel} could not be read"))
                else:
                    blob._fill(got)
        except BaseException as exc:  # noqa: BLE001 - every waiter must wake up, whatever happened
            with pending_lock:
                left = ([item] if item is not None else []) + pending
                pending.clear()
            for _e, blob in left:
                if not blob._done.is_set():
                    blob._fail(exc)
            result._late.append(_finding("FILE-UNREADABLE", Severity.HIGH, "", f"reading failed: {exc}"))

    def read_deferred() -> None:
        try:
            readers = [threading.Thread(target=reader, name=f"sdsecure-read-{k}", daemon=True)
                       for k in range(max(1, min(READ_THREADS, len(deferred))))]
            for t in readers:
                t.start()
            for t in readers:
                t.join()
        finally:
            for fd in area_fds:
                os.close(fd)
            bar_finish()
            result.seconds = time.perf_counter() - t0

    bar_update, bar_finish = result._progress
    result._background = threading.Thread(target=read_deferred, name="sdsecure-read", daemon=True)
    result._background.start()
    return result


def _list(root_fd: int, real_root: Path, areas: list[Path], include, descend, limits: Limits,
          findings: list[Finding]) -> tuple[list[_Entry], dict[tuple[int, int], int]]:
    """List the snapshot (no file contents yet), resolving and vetting symlinks. Also counts the
    names each regular file has inside the snapshot (to tell internal hard links from escaping ones)."""
    entries: list[_Entry] = []
    names_inside: dict[tuple[int, int], int] = {}
    nitems = 0
    too_many = False

    def visit(dir_fd: int, prefix: tuple[str, ...], depth: int) -> None:
        nonlocal nitems, too_many
        with os.scandir(dir_fd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            rel_parts = prefix + (name,)
            rel = "/".join(rel_parts)
            if descend is not None and not include(rel) and not descend(rel):
                continue
            if not _name_ok(name):
                findings.append(_finding("FILE-BAD-NAME", Severity.MEDIUM, rel.encode("utf-8", "replace").decode(),
                                         "file name is not a plain UTF-8 name; not read", name=repr(name)))
                continue
            nitems += 1
            if nitems > limits.max_files:
                if not too_many:
                    findings.append(_finding("FILE-TOO-MANY", Severity.HIGH, rel,
                                             f"more than {limits.max_files} entries; the rest is not read",
                                             cap=limits.max_files))
                too_many = True
                return
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, rel, f"cannot stat: {exc.strerror}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 > limits.max_depth:
                    findings.append(_finding("FILE-TOO-MANY", Severity.HIGH, rel,
                                             f"folder nesting deeper than {limits.max_depth}; not read",
                                             cap=limits.max_depth))
                    continue
                try:
                    sub = os.open(name, _O_DIR, dir_fd=dir_fd)
                except OSError as exc:
                    findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, rel, f"cannot open folder: {exc.strerror}"))
                    continue
                try:
                    visit(sub, rel_parts, depth + 1)
                finally:
                    os.close(sub)
                if too_many:
                    return
                continue
            if stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                names_inside[key] = names_inside.get(key, 0) + 1
            if include is not None and not include(rel):
                continue
            if stat.S_ISLNK(st.st_mode):
                e = _resolve_symlink(real_root, rel, areas, findings)
                if e is not None:
                    entries.append(e)
                continue
            if not stat.S_ISREG(st.st_mode):
                findings.append(_special(rel, st))
                continue
            entries.append(_Entry(rel, 0, rel_parts, st, False))

    visit(root_fd, (), 0)
    return entries, names_inside


def _special(rel: str, st: os.stat_result) -> Finding:
    kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
            else "character device" if stat.S_ISCHR(st.st_mode) else "block device"
            if stat.S_ISBLK(st.st_mode) else "special file")
    return _finding("FILE-SPECIAL", Severity.CRITICAL, rel, f"{kind} in the model folder; not read", kind=kind)


def _resolve_symlink(real_root: Path, rel: str, areas: list[Path], findings: list[Finding]) -> _Entry | None:
    link = real_root / rel
    try:
        target = os.readlink(link)
    except OSError as exc:
        findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, rel, f"cannot read symlink: {exc.strerror}"))
        return None
    resolved = Path(os.path.realpath(link))
    for i, area in enumerate(areas):
        if resolved == area or area in resolved.parents:
            break
    else:
        findings.append(_finding("FILE-SYMLINK-ESCAPE", Severity.CRITICAL, rel,
                                 f"symlink points outside the model folder (to {target!r}); not read",
                                 target=target, resolved=str(resolved)))
        return None
    try:
        st = os.stat(resolved, follow_symlinks=False)
    except FileNotFoundError:
        findings.append(_finding("FILE-SYMLINK-DANGLING", Severity.MEDIUM, rel,
                                 f"symlink target {target!r} does not exist", target=target))
        return None
    except OSError as exc:
        findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, rel, f"cannot stat symlink target: {exc.strerror}"))
        return None
    if stat.S_ISLNK(st.st_mode):        # realpath stops at a loop
        findings.append(_finding("FILE-SYMLINK-DANGLING", Severity.MEDIUM, rel,
                                 f"symlink {target!r} loops and names no file", target=target))
        return None
    if stat.S_ISDIR(st.st_mode):
        findings.append(_finding("FILE-SYMLINK-DIR", Severity.MEDIUM, rel,
                                 f"symlink to a directory ({target!r}) is not followed", target=target))
        return None
    if not stat.S_ISREG(st.st_mode):
        findings.append(_special(rel, st))
        return None
    parts = resolved.relative_to(areas[i]).parts
    return _Entry(rel, i, parts, st, True)


def _open_beneath(area_fd: int, parts: tuple[str, ...]) -> int:
    """Open `parts` below a directory descriptor without following any symlink on the way."""
    fd = area_fd
    opened: list[int] = []
    try:
        for comp in parts[:-1]:
            fd = os.open(comp, _O_DIR, dir_fd=fd)
            opened.append(fd)
        return os.open(parts[-1], _O_FILE, dir_fd=fd)
    finally:
        for d in opened:
            os.close(d)


def _read_entries(entries: list[_Entry], names_inside: dict[tuple[int, int], int], area_fds: list[int],
                  limits: Limits, progress: bool, result: WalkResult,
                  defer_large: bool = False) -> list[tuple[_Entry, Blob]]:
    """Read the small files (all files unless `defer_large`); return the (entry, deferred blob)
    pairs left for a background reader, ONNX files first."""
    findings = result.findings
    todo: list[_Entry] = []
    total = 0
    seen_keys: set[tuple[int, int]] = set()
    stop_total = False
    for e in entries:
        key = (e.st.st_dev, e.st.st_ino)
        if e.st.st_size > limits.max_file_bytes:
            findings.append(_finding("FILE-TOO-LARGE", Severity.HIGH, e.rel,
                                     f"{e.st.st_size} bytes is above the per-file cap of {limits.max_file_bytes}; not read",
                                     size=e.st.st_size, cap=limits.max_file_bytes))
            continue
        in_blob_store = e.area > 0
        if e.st.st_nlink > 1 and not in_blob_store:
            inside = names_inside.get(key, 0)
            if e.st.st_nlink > inside:
                findings.append(_finding("FILE-HARDLINK-ESCAPE", Severity.CRITICAL, e.rel,
                                         f"file has {e.st.st_nlink} hard links but only {inside} inside the model "
                                         "folder: another name lies outside it; not read",
                                         nlink=e.st.st_nlink, names_inside=inside))
                continue
            if key not in seen_keys:
                findings.append(_finding("FILE-HARDLINK", Severity.INFO, e.rel,
                                         f"hard-linked {e.st.st_nlink} times inside the model folder (read once)",
                                         nlink=e.st.st_nlink))
        if key not in seen_keys:
            if stop_total or total + e.st.st_size > limits.max_total_bytes:
                if not stop_total:
                    findings.append(_finding("FILE-TOTAL-TOO-LARGE", Severity.HIGH, e.rel,
                                             f"the model exceeds the total cap of {limits.max_total_bytes} bytes; "
                                             "this and later files are not read", cap=limits.max_total_bytes))
                stop_total = True
                continue
            total += e.st.st_size
            seen_keys.add(key)
        todo.append(e)

    bar = HashProgress(total, progress)
    by_inode: dict[tuple[int, int], Blob] = {}
    deferred: list[tuple[_Entry, Blob]] = []
    for e in todo:
        key = (e.st.st_dev, e.st.st_ino)
        if key in by_inode:
            result.files[e.rel] = by_inode[key]
            continue
        if defer_large and e.st.st_size > IN_MEMORY_LIMIT:
            blob = Blob.deferred_read(e.st.st_size)
            deferred.append((e, blob))
        else:
            blob = _read_one(e, area_fds, bar.update, findings)
        if blob is not None:
            by_inode[key] = blob
            result.files[e.rel] = blob
    deferred.sort(key=lambda eb: (not eb[0].rel.endswith(".onnx"), eb[0].rel))
    result._progress = (bar.update, lambda: bar.finish(len(by_inode)))
    if not deferred:
        bar.finish(len(by_inode))
    return deferred


def _read_one(e: _Entry, area_fds: list[int], on_progress, findings: list[Finding]) -> Blob | None:
    try:
        fd = _open_beneath(area_fds[e.area], e.parts)
    except OSError as exc:
        # ELOOP: a component became a symlink after listing; ENXIO etc.: special file swapped in.
        findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, e.rel,
                                 f"cannot open without following links: {exc.strerror}", errno=exc.errno))
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            findings.append(_special(e.rel, st))
            return None
        if (st.st_dev, st.st_ino) != (e.st.st_dev, e.st.st_ino) or st.st_size != e.st.st_size:
            findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, e.rel,
                                     "file was replaced or changed size while the model was being read"))
            return None
        os.set_blocking(fd, True)
        try:
            return read_blob(fd, st.st_size, e.rel, on_progress)
        except OSError as exc:
            findings.append(_finding("FILE-UNREADABLE", Severity.HIGH, e.rel, str(exc)))
            return None
    finally:
        os.close(fd)


def read_single_file(path: str | os.PathLike, *, limits: Limits | None = None) -> tuple[Blob, str]:
    """Read one file given by the user (e.g. an explicit lockfile) once, without following a final
    symlink. Returns (blob, real path). UserError when it cannot be read."""
    limits = limits or Limits.from_env()
    p = Path(path)
    try:
        fd = os.open(p, _O_FILE)
    except OSError as exc:
        raise UserError(f"cannot open {str(path)!r}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{str(path)!r} is not a regular file")
        if st.st_size > limits.max_file_bytes:
            raise UserError(f"{str(path)!r} is larger than the cap of {limits.max_file_bytes} bytes")
        os.set_blocking(fd, True)
        return read_blob(fd, st.st_size, p.name), os.path.realpath(p)
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc}") from None
    finally:
        os.close(fd)
