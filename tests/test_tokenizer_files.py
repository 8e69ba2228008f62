"""The committed CLIP tokenizer files are the official ones, and give SD 1.5's token ids."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from conftest import BOS_ID, EOS_ID, FIXTURE_MODEL_DIRS, MAX_TOKENS, TOOLS_DIR

MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
VOCAB_SHA256 = "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"


def _load_tool():
    spec = importlib.util.spec_from_file_location("derive_clip_tokenizer", TOOLS_DIR / "derive_clip_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


derive = _load_tool()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_official_hashes_and_sizes(tokenizer_dir: Path) -> None:
    assert _sha(tokenizer_dir / "merges.txt") == MERGES_SHA256
    assert (tokenizer_dir / "merges.txt").stat().st_size == 524_619
    assert _sha(tokenizer_dir / "vocab.json") == VOCAB_SHA256
    assert (tokenizer_dir / "vocab.json").stat().st_size == 961_143


@pytest.mark.parametrize("kind", sorted(FIXTURE_MODEL_DIRS))
def test_every_fixture_has_the_same_tokenizer(tokenizer_dir: Path, kind: str) -> None:
    other = FIXTURE_MODEL_DIRS[kind] / "tokenizer"
    names = sorted(p.name for p in tokenizer_dir.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in other.iterdir()) == names
    for name in names:
        assert (other / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_vocab_rebuilt_from_merges_by_the_rule(tokenizer_dir: Path) -> None:
    """The tool's derivation rule, run on the committed merges.txt, reproduces both files byte for byte."""
    merges_bytes = (tokenizer_dir / "merges.txt").read_bytes()
    merges = derive.parse_merges_txt(merges_bytes)
    assert len(merges) == 48_894
    assert derive.merges_txt(merges) == merges_bytes
    vocab = derive.vocab_from_merges(merges)
    assert len(vocab) == 49_408
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert derive.vocab_json(vocab) == (tokenizer_dir / "vocab.json").read_bytes()


def test_config_files_are_what_the_tool_writes(tokenizer_dir: Path) -> None:
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg == derive.tokenizer_config()
    assert cfg["model_max_length"] == MAX_TOKENS and cfg["pad_token"] == "<|endoftext|>"
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text()) == derive.special_tokens_map()


def test_wrong_source_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = gzip.compress(b'"bpe_simple_vocab_16e6.txt#version: 0.2\na b\n')
    with pytest.raises(derive.DeriveError, match="sha256"):
        derive.derive(fake)
    src = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    src.write_bytes(fake)
    assert derive.main([str(tmp_path / "out"), "--source", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: source sha256 is") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _installed_bpe() -> bool:
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(f.name == derive.SOURCE_NAME for f in dist.files or [])


@pytest.mark.fixture_tools  # needs the `fixtures` extra; deselected by default, run with `-m fixture_tools`
def test_derivation_from_the_installed_wheel(tmp_path: Path, tokenizer_dir: Path) -> None:
    assert _installed_bpe(), "install the `fixtures` extra (open-clip-torch 3.3.0) to run this test"
    derive.main([str(tmp_path)])
    for name in ("merges.txt", "vocab.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("prompt, ids", [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("Hello, World! 123", [49406, 3306, 267, 1002, 256, 272, 273, 274, 49407]),
])
def test_published_ids(tokenizer: CLIPTokenizer, prompt: str, ids: list[int]) -> None:
    assert tokenizer(prompt).input_ids == ids


def test_published_ids_astronaut(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("a photo of an astronaut riding a horse on mars").input_ids
    assert ids[0] == BOS_ID
    assert ids[-8:] == [550, 18376, 6765, 320, 4558, 525, 7496, 49407]


def test_padding_to_77(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == MAX_TOKENS and tokenizer.pad_token_id == EOS_ID
    enc = tokenizer(["a photo of a cat", "word " * 200], padding="max_length", max_length=MAX_TOKENS,
                    truncation=True, return_tensors="np")
    ids = enc.input_ids
    assert ids.shape == (2, MAX_TOKENS)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, 7:].tolist() == [EOS_ID] * 70
    assert ids[1, 0] == BOS_ID and ids[1, -1] == EOS_ID  # truncated, still ends with EOS
