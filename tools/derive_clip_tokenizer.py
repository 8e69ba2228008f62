#!/usr/bin/env python3
"""Derive the CLIP ViT-L/14 tokenizer files of SD 1.5 from the BPE that ships in open-clip-torch.

The Hub is out of reach, but `open_clip/bpe_simple_vocab_16e6.txt.gz` in the open-clip-torch 3.3.0
wheel holds the same BPE. From it this writes, byte-identical to openai/clip-vit-large-patch14:

    merges.txt   "#version: 0.2" + the 48,894 merges          sha256 9fd691f7...
    vocab.json   256 byte chars, the same with </w>, the merges joined, <|startoftext|>,
                 <|endoftext|>: 49,408 ids (json.dumps, ensure_ascii=False, insertion order)
                                                              sha256 3f0c4f7d...

plus special_tokens_map.json and tokenizer_config.json for transformers' CLIPTokenizer as SD 1.5 uses
it (pad = <|endoftext|>, model_max_length 77). See shared/reference/clip_tokenizer.md (the project reference data).

    python tools/derive_clip_tokenizer.py OUT_DIR [--source bpe.txt.gz | open_clip_torch-3.3.0-*.whl]

Without --source the file is taken from the installed open_clip_torch distribution (found through its
metadata, so importing open_clip, which needs torchvision, is not required). A source whose sha256 is
not the expected one is refused.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

SOURCE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOURCE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
VOCAB_SHA256 = "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"
NUM_MERGES = 48894  # 49408 ids - 512 byte tokens - 2 special tokens
MERGES_HEADER = "#version: 0.2"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


class DeriveError(Exception):
    """Bad or missing source; printed as one line."""


def bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode map, in CLIP's vocabulary order:
    the printable Latin-1 bytes first, then the other bytes mapped to 256 + n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def merges_from_bpe_text(text: str) -> list[str]:
    """The merges CLIP uses: lines 1..48894 after the header line of the open_clip BPE file."""
    lines = text.split("\n")
    merges = lines[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise DeriveError("BPE text does not have the expected 48,894 'a b' merge lines")
    return merges


def merges_txt(merges: list[str]) -> bytes:
    return (MERGES_HEADER + "\n" + "\n".join(merges) + "\n").encode("utf-8")


def vocab_from_merges(merges: list[str]) -> dict[str, int]:
    byte_chars = bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DeriveError("derived vocabulary has duplicate tokens")
    return vocab


def vocab_json(vocab: dict[str, int]) -> bytes:
    return json.dumps(vocab, ensure_ascii=False).encode("utf-8")


def parse_merges_txt(data: bytes) -> list[str]:
    """Inverse of merges_txt (used to rebuild vocab.json from a committed merges.txt)."""
    lines = data.decode("utf-8").split("\n")
    if lines[0] != MERGES_HEADER or lines[-1] != "":
        raise DeriveError("merges.txt lacks the '#version: 0.2' header or the final newline")
    return lines[1:-1]


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}


def tokenizer_config() -> dict:
    return {
        "add_prefix_space": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def _json_file(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_source(source: Path | None) -> bytes:
    """The gzip-compressed BPE: from a .gz file, from inside a wheel, or from the installed package."""
    if source is None:
        import importlib.metadata as md

        try:
            dist = md.distribution("open_clip_torch")
        except md.PackageNotFoundError:
            raise DeriveError("open_clip_torch is not installed; pass --source (the .gz or the 3.3.0 wheel)") from None
        found = [f for f in (dist.files or []) if f.name == SOURCE_NAME]
        if not found:
            raise DeriveError(f"installed open_clip_torch has no {SOURCE_NAME}")
        return Path(dist.locate_file(found[0])).read_bytes()
    if not source.is_file():
        raise DeriveError(f"source {source} is not a file")
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + SOURCE_NAME)]
            if not names:
                raise DeriveError(f"wheel {source.name} has no {SOURCE_NAME}")
            return wheel.read(names[0])
    return source.read_bytes()


def derive(gz_bytes: bytes) -> dict[str, bytes]:
    """File name -> bytes of the four tokenizer files. Refuses a source with the wrong hash and checks
    the result against the official hashes."""
    digest = hashlib.sha256(gz_bytes).hexdigest()
    if digest != SOURCE_SHA256:
        raise DeriveError(f"source sha256 is {digest}, expected {SOURCE_SHA256} ({SOURCE_NAME} of open-clip-torch 3.3.0)")
    merges = merges_from_bpe_text(gzip.decompress(gz_bytes).decode("utf-8"))
    files = {
        "merges.txt": merges_txt(merges),
        "vocab.json": vocab_json(vocab_from_merges(merges)),
        "special_tokens_map.json": _json_file(special_tokens_map()),
        "tokenizer_config.json": _json_file(tokenizer_config()),
    }
    for name, want in (("merges.txt", MERGES_SHA256), ("vocab.json", VOCAB_SHA256)):
        got = hashlib.sha256(files[name]).hexdigest()
        if got != want:  # would mean the rule above is wrong, not the source
            raise DeriveError(f"derived {name} has sha256 {got}, expected {want}")
    return files


def write_tokenizer(out_dir: Path, source: Path | None = None) -> dict[str, bytes]:
    files = derive(read_source(source))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="folder to write the tokenizer files into")
    ap.add_argument("--source", type=Path, default=None, help=f"{SOURCE_NAME} or the open_clip_torch 3.3.0 wheel")
    args = ap.parse_args(argv)
    try:
        files = write_tokenizer(args.out_dir, args.source)
    except (DeriveError, OSError, zipfile.BadZipFile, gzip.BadGzipFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, data in files.items():
        print(f"{args.out_dir / name}  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
