"""Build plans: a cached start binds the MEFs it needs without building the MAX graph again.

Building the full UNet's MAX graph takes about 2 s of Python on every start, only to hash its text and
find the MEF that text compiled to. A plan keeps what the build left behind, per compiled piece: the
MEF key, and the weights MAX binds (the folded graph's constants by name, plus the few small arrays the
importer derived, stored in the plan).

The key covers everything a build depends on:
- `source`: a digest of the verified files the graph and its weights came from (VerifiedModel.source_digest),
  so the values of every constant, derived arrays included, are pinned;
- the folded graph's structure: nodes, types, constants' shapes, and whatever fold and fuse decided
  (input shapes and switches such as SDSECURE_TAP_CONV show up there);
- the number of pieces, the channels-last switch, the engine's own source code, and the MAX build and
  CPU (as for MEF keys).
Plans are written next to the MEFs, in the same private directory, and trusted as they are. A plan that
cannot be read or does not fit is removed, and the graph is built as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from sdsecure.engine import layout, mef_cache
from sdsecure.engine.fold import FoldedGraph

log = logging.getLogger(__name__)

PLAN_VERSION = 1
_META = "__plan__"          # the npz member holding the plan's JSON


@dataclass
class PiecePlan:
    mef_key: str
    named: list[str]                       # weights bound to the folded graph's constants of that name
    derived: dict[str, np.ndarray]         # small arrays the importer made (stored in the plan)


class PlanMismatch(Exception):
    """A stored plan does not fit the graph at hand (the caller builds instead)."""


@lru_cache(maxsize=1)
def engine_fingerprint() -> str:
    """sha256 of this package's engine sources: a changed importer makes every plan stale."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def plan_key(folded: FoldedGraph, source: str, pieces: int, device: str) -> str:
    h = hashlib.sha256()
    head = {"version": PLAN_VERSION, "source": source, "pieces": pieces, "device": device,
            "channels_last": layout.ENABLED, "engine": engine_fingerprint(), "target": mef_cache._target(),
            "opsets": sorted(folded.opsets.items()), "inputs": folded.inputs, "outputs": folded.outputs,
            "alias": sorted(folded.alias.items()), "initializers": sorted(folded.initializers),
            "untyped": sorted(folded.untyped)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for node in folded.nodes:
        h.update(node.SerializeToString(deterministic=True))
    for name in sorted(folded.infos):
        info = folded.infos[name]
        h.update(f"\0{name}:{info.dtype.str}:{info.shape}".encode())
    for name in sorted(folded.consts):
        arr = folded.consts[name]
        h.update(f"\0c{name}:{arr.dtype.str}:{arr.shape}".encode())
    return h.hexdigest()


def _path(key: str) -> Path:
    return mef_cache.cache_dir() / f"{key}.plan.npz"


def load(key: str) -> list[PiecePlan] | None:
    """The stored plan for `key`, or None (a file that cannot be read is removed)."""
    path = _path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode("utf-8"))
            if meta.get("version") != PLAN_VERSION:
                raise ValueError(f"plan version {meta.get('version')!r}")
            plans = [PiecePlan(p["mef_key"], list(p["named"]), {n: np.array(data[f"{k}/{n}"]) for n in p["derived"]})
                     for k, p in enumerate(meta["pieces"])]
    except Exception as e:  # noqa: BLE001 - a damaged cache entry: build instead
        log.warning("build plan %s unusable (%s); building the graph", path, e)
        discard(key)
        return None
    return plans


def save(key: str, plans: list[PiecePlan]) -> None:
    """Store atomically (a reader never sees half a plan); a failure only costs the next start time."""
    meta = {"version": PLAN_VERSION,
            "pieces": [{"mef_key": p.mef_key, "named": p.named, "derived": sorted(p.derived)} for p in plans]}
    arrays = {_META: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    for k, p in enumerate(plans):
        arrays.update({f"{k}/{n}": a for n, a in p.derived.items()})
    directory = mef_cache.cache_dir()
    try:
        fd, tmp = tempfile.mkstemp(prefix="plan-", suffix=".npz", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, _path(key))
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.warning("could not store the build plan in %s: %s", directory, e)


def discard(key: str) -> None:
    try:
        _path(key).unlink()
    except OSError:
        pass


def piece_plan(mef_key: str, piece: FoldedGraph, weights: dict[str, np.ndarray]) -> PiecePlan:
    """What a built piece binds: the importer names a weight after the constant it is (engine.importer
    Emitter.tensor), so those are bound by name; the arrays it derived itself are stored."""
    named = [n for n in weights if n in piece.consts]
    derived = {n: np.array(a) for n, a in weights.items() if n not in piece.consts}
    return PiecePlan(mef_key, named, derived)


def bind(plan: PiecePlan, piece: FoldedGraph) -> dict[str, np.ndarray]:
    """The weights registry of a piece from its plan (PlanMismatch when a constant is missing)."""
    weights: dict[str, np.ndarray] = {}
    for name in plan.named:
        arr = piece.consts.get(name)
        if arr is None:
            raise PlanMismatch(f"constant {name!r} is not in the graph")
        weights[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    clash = set(plan.derived) & set(weights)
    if clash:
        raise PlanMismatch(f"derived weights named like constants: {sorted(clash)[:3]}")
    weights.update(plan.derived)
    return weights
