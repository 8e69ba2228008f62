"""CLIP tokenizer built in memory from the verified tokenizer files of a model.

transformers' CLIPTokenizer (5.x, backed by `tokenizers`) accepts the vocabulary as a dict and the merges
as a list of pairs, so nothing is written to disk and nothing is loaded by name: `from_pretrained` (and
with it `tokenizer.json`, remote code and the Hub) is never involved. Only `vocab.json`, `merges.txt`
and the special-token names from `special_tokens_map.json` / `tokenizer_config.json` are read, and only
from the VerifiedModel's bytes.

Prompts longer than the text encoder's window (77 for SD 1.5: start token + 75 + end token) are
truncated, as diffusers does, but never silently: a warning says how many tokens were dropped.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Sequence

import numpy as np

from sdsecure.errors import UserError
from sdsecure.gate.verified import VerifiedModel

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())   # the stderr line below is the user-facing message

MAX_LENGTH = 77
_SPECIAL_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                     "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
_MAX_VOCAB = 1_000_000


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer files store it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _parse_vocab(data: bytes) -> dict[str, int]:
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"tokenizer/vocab.json is not valid JSON: {e}") from None
    if (not isinstance(vocab, dict) or not 0 < len(vocab) <= _MAX_VOCAB
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_VOCAB for v in vocab.values())):
        raise UserError("tokenizer/vocab.json must map tokens to non-negative integer ids")
    return vocab


def _parse_merges(data: bytes) -> list[tuple[str, str]]:
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise UserError("tokenizer/merges.txt is not UTF-8") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"tokenizer/merges.txt line {number} is not a pair of tokens")
        merges.append((parts[0], parts[1]))
    return merges


class PromptTokenizer:
    """Prompts -> fixed-length int32 token ids, [batch, max_length]."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 special_tokens: dict[str, str] | None = None, max_length: int = MAX_LENGTH):
        from transformers import CLIPTokenizer

        special = {**_SPECIAL_DEFAULTS, **(special_tokens or {})}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if special[key] not in vocab:
                raise UserError(f"tokenizer: {key} {special[key]!r} is not in vocab.json")
        if not 2 < max_length <= 4096:
            raise UserError(f"tokenizer: max length {max_length} is out of range")
        self.max_length = max_length
        self._tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                                  **{k: special[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})

    @classmethod
    def from_model(cls, model: VerifiedModel, folder: str = "tokenizer", max_length: int = MAX_LENGTH) -> "PromptTokenizer":
        for name in ("vocab.json", "merges.txt"):
            if not model.has(f"{folder}/{name}"):
                raise UserError(f"model {model.ref!r} is missing its tokenizer: no {folder}/{name}")
        special: dict[str, str] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
            path = f"{folder}/{name}"
            if not model.has(path):
                continue
            try:
                cfg = model.read_json(path)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{path} must be a JSON object")
            for key in _SPECIAL_DEFAULTS:
                text = _token_text(cfg.get(key))
                if text is not None:
                    special[key] = text
        return cls(_parse_vocab(model.read_bytes(f"{folder}/vocab.json")),
                   _parse_merges(model.read_bytes(f"{folder}/merges.txt")), special, max_length)

    def token_count(self, prompt: str) -> int:
        """Tokens in `prompt`, start and end tokens included, before truncation."""
        return len(self._tok(prompt, truncation=False, verbose=False)["input_ids"])

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        for prompt in prompts:
            self._warn_if_truncated(prompt)
        enc = self._tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="np")
        return np.asarray(enc["input_ids"], dtype=np.int32)

    def _warn_if_truncated(self, prompt: str) -> None:
        ids = self._tok(prompt, truncation=False, verbose=False)["input_ids"]
        if len(ids) <= self.max_length:
            return
        dropped = ids[self.max_length - 1:-1]
        text = self._tok.decode(dropped)
        if len(text) > 60:
            text = text[:57] + "..."
        msg = (f"prompt is {len(ids)} tokens but the text encoder reads {self.max_length}: "
               f"the last {len(dropped)} token(s) were dropped ({text!r})")
        logger.warning(msg)
        print(f"warning: {msg}", file=sys.stderr)
