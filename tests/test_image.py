"""PNG output: provenance read back with Pillow, atomic write (nothing half-written on failure)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sdsecure.errors import UserError
from sdsecure.pipeline import image as image_mod
from sdsecure.pipeline.image import check_output_path, save_png

PROVENANCE = {
    "sdsecure:model": "embedded",
    "sdsecure:revision": "local",
    "sdsecure:lockfile_sha256": "ab" * 32,
    "sdsecure:verdict": "allowed",
    "sdsecure:prompt": "a photo of an astronaut riding a horse on mars",
    "sdsecure:negative_prompt": "",
    "sdsecure:seed": "0",
}


def picture(h: int = 24, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_pixels_and_provenance_round_trip(tmp_path):
    img = picture()
    prov = dict(PROVENANCE, **{"sdsecure:prompt": "猫の写真, café — ünïcode", "sdsecure:negative_prompt": "blurry"})
    out = save_png(tmp_path / "x.png", img, prov)
    assert out == tmp_path / "x.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (40, 24)
        np.testing.assert_array_equal(np.asarray(im), img)
        assert im.text == prov                       # every key, Latin-1 (tEXt) and UTF-8 (iTXt)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]   # no temporary left behind
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_non_latin1_values_go_to_itxt(tmp_path):
    out = save_png(tmp_path / "x.png", picture(), {"plain": "abc", "unicode": "Ω"})
    data = out.read_bytes()
    assert b"tEXtplain\x00abc" in data
    assert b"iTXtunicode" in data


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    """The encoder has written part of the file when it fails: no destination, no temporary."""

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise exc

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(type(exc)):
        save_png(tmp_path / "x.png", picture(), PROVENANCE)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    dest = tmp_path / "x.png"
    save_png(dest, picture(), {"sdsecure:seed": "1"})
    before = dest.read_bytes()

    def failing_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(image_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        save_png(dest, picture(8, 8), {"sdsecure:seed": "2"})
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8)])
def test_rejects_wrong_image_arrays(tmp_path, bad):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "x.png", bad, {})
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="PNG keyword"):
        save_png(tmp_path / "x.png", picture(), {"k" * 80: "v"})
    assert list(tmp_path.iterdir()) == []


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.png") == tmp_path / "a.png"
    assert check_output_path(tmp_path / "new" / "dir" / "a.png") == tmp_path / "new" / "dir" / "a.png"
    assert not (tmp_path / "new").exists()          # checking creates nothing
    with pytest.raises(UserError, match="must end in .png"):
        check_output_path(tmp_path / "a.jpg")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        check_output_path(tmp_path / "d.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        check_output_path(tmp_path / "file" / "sub" / "a.png")


def test_check_output_path_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # root ignores permission bits; /proc/self is a folder root cannot write either
            assert not os.access("/proc/self", os.W_OK)
            with pytest.raises(UserError, match="not writable"):
                check_output_path("/proc/self/new/x.png")
        else:
            with pytest.raises(UserError, match="not writable"):
                check_output_path(locked / "a.png")
    finally:
        locked.chmod(0o700)
