"""CLIP tokenizer from the embedded model's verified tokenizer files (the real CLIP ViT-L/14 BPE):
published prompt -> ids pairs, padding, truncation warning, bad files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from pipeline_helpers import EMBEDDED_DIR, verified_from_dir

from sdsecure.errors import UserError
from sdsecure.pipeline.tokenizer import PromptTokenizer

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def model():
    return verified_from_dir(EMBEDDED_DIR, "embedded")


@pytest.fixture(scope="module")
def tok(model):
    return PromptTokenizer.from_model(model)


# published pairs for openai/clip-vit-large-patch14 (SD 1.5's tokenizer)
@pytest.mark.parametrize("prompt, ids", [
    ("a photo of a cat", [BOS, 320, 1125, 539, 320, 2368, EOS]),
    ("Hello, World! 123", [BOS, 3306, 267, 1002, 256, 272, 273, 274, EOS]),
])
def test_published_ids(tok, prompt, ids):
    out = tok([prompt])
    assert out.dtype == np.int32 and out.shape == (1, 77)
    assert out[0, :len(ids)].tolist() == ids
    assert (out[0, len(ids):] == EOS).all()          # padded with <|endoftext|>, as SD 1.5


def test_published_astronaut_tail(tok):
    out = tok(["a photo of an astronaut riding a horse on mars"])[0].tolist()
    end = out.index(EOS)
    assert out[0] == BOS
    assert out[end - 7:end + 1] == [550, 18376, 6765, 320, 4558, 525, 7496, EOS]


def test_batch_of_negative_and_prompt(tok):
    out = tok(["", "a photo of a cat"])
    assert out.shape == (2, 77)
    assert out[0, 0] == BOS and (out[0, 1:] == EOS).all()      # empty negative prompt
    assert out[1, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_long_prompt_is_truncated_with_a_warning(tok, capsys, caplog):
    prompt = " ".join(["cat"] * 80) + " on the moon"
    assert tok.token_count(prompt) == 85
    with caplog.at_level(logging.WARNING, logger="sdsecure.pipeline.tokenizer"):
        out = tok([prompt])
    assert out.shape == (1, 77) and out[0, 0] == BOS and out[0, -1] == EOS
    assert (out[0, 1:76] == 2368).all()                          # 75 "cat" kept
    err = capsys.readouterr().err
    assert "85 tokens" in err and "last 8 token(s) were dropped" in err and "on the moon" in err
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_no_warning_at_exactly_77(tok, capsys):
    prompt = " ".join(["cat"] * 75)
    assert tok.token_count(prompt) == 77
    tok([prompt])
    assert "dropped" not in capsys.readouterr().err


def test_missing_tokenizer_file(model):
    m = verified_from_dir(EMBEDDED_DIR, skip=("tokenizer/merges.txt",))
    with pytest.raises(UserError, match="missing its tokenizer: no tokenizer/merges.txt"):
        PromptTokenizer.from_model(m)


@pytest.mark.parametrize("path, data, message", [
    ("tokenizer/vocab.json", b"{not json", "not valid JSON"),
    ("tokenizer/vocab.json", b'{"a": "b"}', "non-negative integer ids"),
    ("tokenizer/merges.txt", b"#version: 0.2\na b c\n", "line 2 is not a pair"),
    ("tokenizer/special_tokens_map.json", json.dumps({"pad_token": "<|nope|>"}).encode(), "not in vocab.json"),
])
def test_bad_tokenizer_files(path, data, message):
    m = verified_from_dir(EMBEDDED_DIR, replace={path: data})
    with pytest.raises(UserError, match=message):
        PromptTokenizer.from_model(m)


def test_special_tokens_come_from_the_files():
    """SD 2.x style: pad with "!" (id 0) as its special_tokens_map says."""
    m = verified_from_dir(EMBEDDED_DIR, replace={
        "tokenizer/special_tokens_map.json": json.dumps({"pad_token": "!", "bos_token": {"content": "<|startoftext|>"}}).encode()})
    out = PromptTokenizer.from_model(m)(["a photo of a cat"])
    assert out[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (out[0, 7:] == 0).all()
