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
from dataclasses import dataclass
from typing import Callable

IN_MEMORY_LIMIT = 64 << 20          # files up to this size are kept as bytes
CHUNK = 8 << 20                     # streaming read size


@dataclass(frozen=True)
class Blob:
    data: "bytes | mmap.mmap"       # never written after construction
    sha256: str
    size: int

    def view(self) -> memoryview:
        """A read-only view of the verified bytes (zero-copy)."""
        return memoryview(self.data).toreadonly()

    def bytes(self) -> bytes:
        """The verified bytes as `bytes` (copies large blobs: use view() for weights)."""
        return self.data if isinstance(self.data, bytes) else bytes(self.view())

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

    # Large file: stream into a sealed memfd; the hash covers exactly the bytes stored.
    mfd = _sealed_memfd(size, name)
    try:
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        got = 0
        while got < size:
            n = os.readv(fd, [mv[: min(CHUNK, size - got)]])
            if n == 0:
                break
            h.update(mv[:n])
            written = 0
            while written < n:
                written += os.pwrite(mfd, mv[written:n], got + written)
            got += n
            if on_progress:
                on_progress(n)
        if got != size or os.read(fd, 1):
            raise OSError(f"{name}: size changed while reading (expected {size} bytes)")
        import fcntl

        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        mm = mmap.mmap(mfd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    finally:
        os.close(mfd)
    return Blob(mm, h.hexdigest(), size)
