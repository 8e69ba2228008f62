"""PNG output with provenance, written atomically.

Provenance (model, revision, lockfile hash, gate verdict, prompt, seed, ...) goes into PNG text chunks:
tEXt for plain Latin-1 values, iTXt (UTF-8) for anything else, so a prompt in any script survives.
Pillow reads them back as `Image.open(path).text`.

The file appears complete or not at all: the PNG is written to a temporary file in the same folder,
flushed and fsync'ed, then renamed over the destination with os.replace (atomic on POSIX). On any error,
KeyboardInterrupt included, the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from sdsecure.errors import UserError

_MAX_KEY = 79    # PNG keyword limit


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def png_info(provenance: Mapping[str, str]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in provenance.items():
        key, value = str(key), str(value)
        if not 1 <= len(key) <= _MAX_KEY or not _is_latin1(key) or "\x00" in key:
            raise ValueError(f"provenance key {key!r} is not a valid PNG keyword (1-79 Latin-1 characters)")
        value = value.replace("\x00", "")
        if _is_latin1(value):
            info.add_text(key, value)
        else:
            info.add_itxt(key, value)
    return info


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any slow work) if `path` cannot be written: a one-line UserError.
    Missing parent folders are fine (the caller creates them when it writes) as long as the nearest
    existing one is a writable folder. Nothing is created here."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UserError(f"output {str(p)!r} must end in .png")
    if p.is_dir():
        raise UserError(f"output {str(p)!r} is a folder")
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {str(p)!r}: {str(ancestor)!r} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {str(p)!r}: folder {str(ancestor)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"output {str(p)!r} exists and is not writable")
    return p


def save_png(path: str | os.PathLike, image: np.ndarray, provenance: Mapping[str, str]) -> Path:
    """Write `image` (H, W, 3) uint8 to `path` as a PNG carrying `provenance`, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    dest = Path(path)
    info = png_info(provenance)
    folder = dest.parent if str(dest.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return dest


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would race threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
