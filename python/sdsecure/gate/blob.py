"""Read-once, immutable file contents.

A Blob holds the exact bytes that were hashed. Small files live in memory as `bytes`; large ones
(external weights, GBs) are copied once, while hashing, into a sealed memfd (Linux) so that nobody,
not even the file's owner, can change them afterwards, and are exposed as a read-only mmap.
The engine builds numpy views on `Blob.view()`: no second read from disk, no second copy.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from typing import Callable

IN_MEMORY_LIMIT = 64 << 20          # files up to this size are kept as bytes
CHUNK = 8 << 20                     # streaming read size


class BlobUnavailable(OSError):
    """A deferred blob whose read failed (the walk reports why as a finding)."""


class Blob:
    """The verified bytes of one file, their sha256 and size; never written after they are set.

    A *deferred* blob (Blob.deferred) knows only its size at first: a background reader fills it in
    while the rules look at other files, and `data` / `sha256` wait for it (see files.walk_snapshot)."""

    __slots__ = ("size", "deferred", "_data", "_sha256", "_done", "_error")

    def __init__(self, data: "bytes | mmap.mmap", sha256: str, size: int):
        self.size = size
        self.deferred = False
        self._data, self._sha256, self._error = data, sha256, None
        self._done = None

    @classmethod
    def deferred_read(cls, size: int) -> "Blob":
        blob = cls(b"", "", size)
        blob.deferred = True
        blob._done = threading.Event()
        return blob

    def _fill(self, other: "Blob") -> None:
        self._data, self._sha256 = other._data, other._sha256
        self._done.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._done.set()

    def wait(self) -> bool:
        """Block until a deferred read is over; False if it failed."""
        if self._done is not None:
            self._done.wait()
        return self._error is None

    def _require(self) -> None:
        if not self.wait():
            raise BlobUnavailable(f"the file could not be read: {self._error}")

    @property
    def data(self) -> "bytes | mmap.mmap":
        self._require()
        return self._data

    @property
    def sha256(self) -> str:
        self._require()
        return self._sha256

    def __repr__(self) -> str:
        state = "pending" if self._done is not None and not self._done.is_set() else self._sha256[:12]
        return f"Blob(size={self.size}, {state})"

    def view(self) -> memoryview:
        """A read-only view of the verified bytes (zero-copy)."""
        return memoryview(self.data).toreadonly()

    def bytes(self) -> bytes:
        """The verified bytes as `bytes` (copies large blobs: use view() for weights)."""
        data = self.data
        return data if isinstance(data, bytes) else bytes(self.view())

    def release(self) -> None:
        """Drop a large blob's pages from this process's resident set after a full pass over it.
        The bytes stay in the sealed memfd and come back on the next access (nothing is lost)."""
        if isinstance(self.data, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            self.data.madvise(mmap.MADV_DONTNEED)

    def parse_onnx(self):
        """A fresh ModelProto parsed from the verified bytes, without copying them first."""
        import onnx

        model = onnx.ModelProto()
        model.ParseFromString(self.view())
        return model

    @classmethod
    def from_bytes(cls, data: bytes) -> "Blob":
        return cls(bytes(data), hashlib.sha256(data).hexdigest(), len(data))


def _sealed_memfd(size: int, name: str) -> int:
    fd = os.memfd_create(f"sdsecure:{name}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def read_blob(fd: int, size: int, name: str, on_progress: Callable[[int], None] | None = None) -> Blob:
    """Read `size` bytes from an open file descriptor exactly once, hashing as we go.

    Raises OSError if the file is shorter or longer than `size` (it changed while we read it)."""
    h = hashlib.sha256()
    if size <= IN_MEMORY_LIMIT:
        parts = []
        got = 0
        while True:
            chunk = os.read(fd, min(CHUNK, size + 1 - got)) if got <= size else b""
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            if on_progress:
                on_progress(len(chunk))
        data = b"".join(parts)
        if len(data) != size:
            raise OSError(f"{name}: size changed while reading ({size} -> {len(data)} bytes)")
        h.update(data)
        return Blob(data, h.hexdigest(), size)

    return _read_large(fd, size, name, h, on_progress)


WINDOW = 64 << 20                   # large files: copy / hash step


def _read_large(fd: int, size: int, name: str, h: "hashlib._Hash",
                on_progress: Callable[[int], None] | None) -> Blob:
    """Large file: the kernel copies it once into a memfd (sendfile, no user-space copy) while this
    thread hashes what has already landed there, window by window. The hash therefore covers exactly
    the bytes stored; the memfd is then sealed and exposed as a read-only mmap. Copy and hash run in
    parallel (both release the GIL), so the wall time is close to the hashing time alone. Each hashed
    window is unmapped at once: the resident set stays small whatever the file size."""
    import fcntl

    mfd = _sealed_memfd(size, name)
    copied = 0                                  # bytes in the memfd so far (written by the copier)
    error: list[BaseException] = []
    cond = threading.Condition()
    stop = threading.Event()                    # the hashing side failed: stop copying

    def copier() -> None:
        nonlocal copied
        try:
            done = 0
            use_sendfile = True
            buf = None
            while done < size and not stop.is_set():
                step = min(WINDOW, size - done)
                n = 0
                if use_sendfile:
                    try:
                        n = os.sendfile(mfd, fd, done, step)
                    except OSError:             # filesystem without sendfile support: plain copy
                        use_sendfile = False
                if not use_sendfile:
                    buf = buf or bytearray(WINDOW)
                    n = os.preadv(fd, [memoryview(buf)[:step]], done)
                    w = 0
                    while w < n:
                        w += os.pwrite(mfd, memoryview(buf)[w:n], done + w)
                if n == 0:
                    raise OSError(f"{name}: size changed while reading (expected {size} bytes, got {done})")
                done += n
                with cond:
                    copied = done
                    cond.notify()
            if not stop.is_set() and os.pread(fd, 1, size):
                raise OSError(f"{name}: size changed while reading (longer than {size} bytes)")
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread
            with cond:
                error.append(exc)
                cond.notify()

    thread = threading.Thread(target=copier, name=f"sdsecure-copy:{name}"[:60], daemon=True)
    thread.start()
    try:
        hashed = 0
        while hashed < size:
            with cond:
                while copied < min(hashed + WINDOW, size) and not error:
                    cond.wait()
                if error:
                    raise error[0]
                avail = copied
            # hash whole windows only (mmap offsets must stay page-aligned), the tail at the end
            while hashed < avail and (avail - hashed >= WINDOW or avail == size):
                n = min(WINDOW, avail - hashed)
                win = mmap.mmap(mfd, n, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED, offset=hashed)
                try:
                    h.update(win)
                finally:
                    win.close()
                hashed += n
                if on_progress:
                    on_progress(n)
        thread.join()
        if error:
            raise error[0]
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        mm = mmap.mmap(mfd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    finally:
        stop.set()
        thread.join()
        os.close(mfd)
    return Blob(mm, h.hexdigest(), size)
