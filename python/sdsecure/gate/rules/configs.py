"""JSON config rules and remote-code vectors.

Configs decide which Python classes a loader imports: diffusers' `model_index.json` names a
(library, class) per component and imports the library; `auto_map` in a transformers config or
tokenizer config points at Python files in the repo that `trust_remote_code=True` runs; a scheduler
config chooses a scheduler class and sizes its arrays. The SD pipeline of this project reads only
model_index.json, the scheduler config and the tokenizer files, and takes classes from allow-lists,
but the same repo is opened by other tools, so the gate reports every such vector.

JSON is parsed strictly: duplicate keys (parsers disagree on which one wins) and the non-standard
NaN/Infinity constants (Python accepts them, most parsers do not) are findings.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

CONFIG_CAP = 1 << 20          # model_index.json, *config.json, special_tokens_map.json
JSON_CAP = 32 << 20           # other JSON (vocab.json, tokenizer.json)

SUPPORTED_SCHEDULERS = frozenset({"PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"})
KNOWN_SCHEDULERS = frozenset("""
    LMSDiscreteScheduler EulerAncestralDiscreteScheduler DPMSolverMultistepScheduler
    DPMSolverSinglestepScheduler DPMSolverSDEScheduler DDPMScheduler HeunDiscreteScheduler
    KDPM2DiscreteScheduler KDPM2AncestralDiscreteScheduler UniPCMultistepScheduler
    DEISMultistepScheduler LCMScheduler TCDScheduler EDMEulerScheduler EDMDPMSolverMultistepScheduler
    DDIMParallelScheduler DDPMParallelScheduler DDIMInverseScheduler ScoreSdeVeScheduler
    KarrasVeScheduler RePaintScheduler IPNDMScheduler FlowMatchEulerDiscreteScheduler
""".split())

#: (library, class) pairs diffusers/transformers may import for an SD-style pipeline component.
KNOWN_COMPONENTS: frozenset[tuple[str, str]] = frozenset(
    [("diffusers", c) for c in ("OnnxRuntimeModel", "UNet2DConditionModel", "AutoencoderKL",
                                "AutoencoderTiny", "StableDiffusionSafetyChecker")]
    + [("diffusers", s) for s in SUPPORTED_SCHEDULERS | KNOWN_SCHEDULERS]
    + [("stable_diffusion", "StableDiffusionSafetyChecker")]
    + [("transformers", c) for c in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer",
                                     "CLIPTokenizerFast", "CLIPImageProcessor", "CLIPFeatureExtractor",
                                     "CLIPVisionModel", "CLIPVisionModelWithProjection")]
)
KNOWN_PIPELINES = frozenset({"OnnxStableDiffusionPipeline", "StableDiffusionOnnxPipeline",
                             "StableDiffusionPipeline", "ORTStableDiffusionPipeline",
                             "OnnxStableDiffusionImg2ImgPipeline", "OnnxStableDiffusionInpaintPipeline"})
KNOWN_TOKENIZERS = frozenset({"CLIPTokenizer", "CLIPTokenizerFast"})

#: Files that are program code rather than data. Scripts: medium (a human or tool must choose to run
#: them); native libraries: high (onnxruntime custom-op libraries and Python extensions run on load).
SCRIPT_EXTS = frozenset({".py", ".pyc", ".pyo", ".sh", ".bash", ".bat", ".cmd", ".ps1", ".js", ".ipynb"})
NATIVE_EXTS = frozenset({".so", ".dll", ".dylib", ".pyd"})
_NATIVE_MAGIC = (b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                 b"\xcf\xfa\xed\xfe")

TOO_LARGE = declare(
    "CONFIG-TOO-LARGE", Severity.MEDIUM,
    "JSON file larger than the cap for its kind",
    "Pipeline configs are a few KB. A multi-megabyte config is not produced by any exporter and "
    "exists to exhaust the parser (memory/CPU) or to hide content; it is not parsed.",
    "Replace the file with the publisher's original.")
INVALID = declare(
    "CONFIG-INVALID-JSON", Severity.MEDIUM,
    "JSON file that does not parse",
    "A config that does not parse makes loaders fail or, in lenient parsers, read something other "
    "than what a reviewer sees.",
    "Re-download the file; compare with the publisher's hash.")
NONSTANDARD = declare(
    "CONFIG-NONSTANDARD-JSON", Severity.LOW,
    "JSON with duplicate keys or NaN/Infinity constants",
    "Duplicate keys are resolved differently by different parsers (first or last wins), so a "
    "reviewer and a loader can see different values; NaN/Infinity are not JSON and are accepted "
    "only by some parsers (Python's among them).",
    "Remove the duplicate keys / non-standard constants.")
SCHED_CLASS = declare(
    "CONFIG-SCHEDULER-CLASS", Severity.HIGH,
    "Scheduler class not on the allow-list",
    "The scheduler config's _class_name chooses code. This pipeline implements PNDM, DDIM and Euler "
    "(in numpy); other diffusers schedulers are reported for information; an unknown name is not a "
    "diffusers scheduler at all and would be resolved by whatever tool loads the repo.",
    "Use one of PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler (pass --scheduler to choose "
    "one), or fix the config.")
SCHED_VALUE = declare(
    "CONFIG-SCHEDULER-VALUE", Severity.MEDIUM,
    "Scheduler config value out of range",
    "Scheduler parameters size arrays and drive the denoising loop: num_train_timesteps of 10^12 is "
    "a memory bomb; betas outside (0, 1) or unknown schedules silently produce garbage images.",
    "Use the values of the original SD 1.5 scheduler config (num_train_timesteps 1000, "
    "beta_start 0.00085, beta_end 0.012, scaled_linear).")
COMPONENT = declare(
    "CONFIG-UNKNOWN-COMPONENT", Severity.HIGH,
    "model_index.json component from an unknown library or class",
    "diffusers imports the library named by each component ([library, class]) and instantiates the "
    "class: an unknown library is an arbitrary import (a module shipped in the repo or installed on "
    "the host), the same vector as trust_remote_code.",
    "Only diffusers/transformers classes of the SD pipeline are expected; remove or fix the entry.")
REMOTE_CODE = declare(
    "CONFIG-REMOTE-CODE", Severity.HIGH,
    "Config that makes loaders run code from the repository",
    "auto_map (transformers), custom_pipeline or a [module, class] _class_name (diffusers) and "
    "trust_remote_code point loaders at Python files shipped in the repo: anyone who opens it with "
    "trust_remote_code=True runs that code.",
    "Remove the entry; the SD pipeline needs no custom code. Never pass trust_remote_code=True for "
    "an untrusted repo.")
TOKENIZER = declare(
    "CONFIG-TOKENIZER-CLASS", Severity.MEDIUM,
    "Tokenizer config names a non-CLIP tokenizer class",
    "SD 1.5 uses the CLIP BPE tokenizer. Another class means the repo is not what it claims, and "
    "tools that resolve the class by name may load something else.",
    "Set tokenizer_class to CLIPTokenizer or remove it.")
CODE_FILE = declare(
    "CONFIG-CODE-FILE", Severity.MEDIUM,
    "Program code or a native library inside the model repository",
    "Model repos need data only. Python files are what trust_remote_code runs; native libraries "
    "(.so/.dll/.dylib, ELF/Mach-O content) can be registered as onnxruntime custom-op libraries or "
    "imported as extensions, running native code on load.",
    "Remove code from the model repo; review it if a documented loader really needs it.")


# --- parsing (shared with sd_repo through ctx.cache) ----------------------------------------------

class _Dup(ValueError):
    pass


def parse_json(raw: bytes) -> tuple[Any, list[str], list[str]]:
    """Strict parse: returns (value, duplicate keys, non-standard constants); raises ValueError."""
    dups: list[str] = []
    consts: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                dups.append(k)
            out[k] = v
        return out

    def constant(name: str) -> float:
        consts.append(name)
        return float(name.replace("Infinity", "inf"))

    text = raw.decode("utf-8-sig")
    value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    return value, dups, consts


def load_json(ctx: ScanContext, path: str) -> Any:
    """The parsed JSON of `path`, or None (missing, too large, or invalid: the rule reports it)."""
    key = ("json", path)
    if key not in ctx.cache:
        blob = ctx.files.get(path)
        value = None
        if blob is not None and blob.size <= _cap(path):
            try:
                value = parse_json(blob.bytes())[0]
            except (ValueError, RecursionError):
                value = None
        ctx.cache[key] = value
    return ctx.cache[key]


def _cap(path: str) -> int:
    base = posixpath.basename(path)
    return CONFIG_CAP if base.endswith("config.json") or base in ("model_index.json",
                                                                  "special_tokens_map.json") else JSON_CAP


# --- checks ----------------------------------------------------------------------------------------

def _walk_keys(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((f"{prefix}{k}", v))
            out.extend(_walk_keys(v, f"{prefix}{k}."))
    elif isinstance(value, list):
        for i, v in enumerate(value[:1000]):
            out.extend(_walk_keys(v, f"{prefix}{i}."))
    return out


def _remote_code(path: str, value: Any) -> list[Finding]:
    out = []
    for key, v in _walk_keys(value):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "auto_map" and v:
            out.append(Finding(REMOTE_CODE.id, Severity.HIGH, path, key,
                               f"{key} maps classes to code in the repo: {json.dumps(v)[:200]}",
                               {"key": key, "value": v}))
        elif leaf in ("custom_pipeline", "trust_remote_code") and v not in (None, False, ""):
            out.append(Finding(REMOTE_CODE.id, Severity.HIGH, path, key, f"{key} = {json.dumps(v)[:200]}",
                               {"key": key, "value": v}))
    return out


def _check_number(path: str, cfg: dict, key: str, lo: float, hi: float, *, integer: bool = False,
                  bomb: float | None = None) -> list[Finding]:
    if key not in cfg or cfg[key] is None:
        return []
    v = cfg[key]
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or not lo <= v <= hi:
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        sev = Severity.HIGH if (bomb is not None and numeric and (not math.isfinite(v) or v > bomb)) \
            else Severity.MEDIUM
        return [Finding(SCHED_VALUE.id, sev, path, key, f"{key} = {json.dumps(v)[:60]} outside "
                        f"[{lo:g}, {hi:g}]", {"key": key, "value": v, "range": [lo, hi]})]
    return []


def _scheduler(path: str, cfg: Any) -> list[Finding]:
    if not isinstance(cfg, dict):
        return [Finding(SCHED_CLASS.id, Severity.MEDIUM, path, "", "scheduler config is not a JSON object", {})]
    out: list[Finding] = []
    cls = cfg.get("_class_name")
    if isinstance(cls, list):
        out.append(Finding(REMOTE_CODE.id, Severity.HIGH, path, "_class_name",
                           f"_class_name {json.dumps(cls)[:120]} names a module of the repo", {"value": cls}))
    elif cls in SUPPORTED_SCHEDULERS:
        pass
    elif cls in KNOWN_SCHEDULERS:
        out.append(Finding(SCHED_CLASS.id, Severity.INFO, path, "_class_name",
                           f"{cls} is a diffusers scheduler this pipeline does not implement; "
                           f"it will use PNDM, DDIM or Euler instead", {"class": cls}))
    elif cls is None:
        out.append(Finding(SCHED_CLASS.id, Severity.MEDIUM, path, "_class_name",
                           "scheduler config has no _class_name", {}))
    else:
        out.append(Finding(SCHED_CLASS.id, Severity.HIGH, path, "_class_name",
                           f"unknown scheduler class {str(cls)[:80]!r}", {"class": str(cls)[:200]}))
    out += _check_number(path, cfg, "num_train_timesteps", 1, 10_000, integer=True, bomb=100_000)
    out += _check_number(path, cfg, "beta_start", 1e-8, 0.999)
    out += _check_number(path, cfg, "beta_end", 1e-8, 0.999)
    out += _check_number(path, cfg, "steps_offset", 0, 1000, integer=True)
    if isinstance(cfg.get("beta_start"), (int, float)) and isinstance(cfg.get("beta_end"), (int, float)) \
            and not cfg["beta_start"] < cfg["beta_end"]:
        out.append(Finding(SCHED_VALUE.id, Severity.MEDIUM, path, "beta_start",
                           f"beta_start {cfg['beta_start']} is not below beta_end {cfg['beta_end']}", {}))
    for key, allowed in (("beta_schedule", {"linear", "scaled_linear", "squaredcos_cap_v2"}),
                         ("prediction_type", {"epsilon", "v_prediction", "sample"}),
                         ("timestep_spacing", {"leading", "trailing", "linspace"})):
        if key in cfg and cfg[key] is not None and cfg[key] not in allowed:
            out.append(Finding(SCHED_VALUE.id, Severity.MEDIUM, path, key,
                               f"{key} = {json.dumps(cfg[key])[:60]} is not one of {sorted(allowed)}",
                               {"key": key, "value": cfg[key]}))
    tb = cfg.get("trained_betas")
    if tb is not None:
        n = cfg.get("num_train_timesteps", 1000)
        if not (isinstance(tb, list) and len(tb) == n and len(tb) <= 10_000
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in tb)):
            out.append(Finding(SCHED_VALUE.id, Severity.MEDIUM, path, "trained_betas",
                               "trained_betas must be num_train_timesteps numbers in (0, 1)",
                               {"length": len(tb) if isinstance(tb, list) else None}))
    return out


def _model_index(path: str, idx: Any) -> list[Finding]:
    if not isinstance(idx, dict):
        return [Finding(COMPONENT.id, Severity.HIGH, path, "", "model_index.json is not a JSON object", {})]
    out: list[Finding] = []
    cls = idx.get("_class_name")
    if isinstance(cls, list):
        out.append(Finding(REMOTE_CODE.id, Severity.HIGH, path, "_class_name",
                           f"pipeline _class_name {json.dumps(cls)[:120]} loads a custom pipeline module",
                           {"value": cls}))
    elif cls not in KNOWN_PIPELINES:
        out.append(Finding(COMPONENT.id, Severity.MEDIUM, path, "_class_name",
                           f"pipeline class {str(cls)[:80]!r} is not an SD 1.5 pipeline class",
                           {"class": str(cls)[:200]}))
    for key, v in idx.items():
        if key.startswith("_") or not isinstance(v, list):
            continue
        if len(v) == 2 and v[0] is None and v[1] is None:
            continue                             # component explicitly absent
        if len(v) != 2 or not all(isinstance(x, str) for x in v) or tuple(v) not in KNOWN_COMPONENTS:
            lib = v[0] if v and isinstance(v[0], str) else None
            reason = ("not a [library, class] pair" if len(v) != 2 or not all(isinstance(x, str) for x in v)
                      else f"library {lib!r} is not diffusers/transformers" if lib not in
                      ("diffusers", "transformers", "stable_diffusion") else f"class {v[1]!r} is not expected")
            out.append(Finding(COMPONENT.id, Severity.HIGH, path, key,
                               f"component {key!r} = {json.dumps(v)[:120]}: {reason}; diffusers would "
                               f"import it", {"component": key, "value": v}))
        elif key == "scheduler" and v[1] in KNOWN_SCHEDULERS:
            out.append(Finding(SCHED_CLASS.id, Severity.INFO, path, key,
                               f"{v[1]} is not implemented here; PNDM, DDIM or Euler will be used",
                               {"class": v[1]}))
    return out


def _tokenizer_config(path: str, cfg: Any) -> list[Finding]:
    if not isinstance(cfg, dict):
        return []
    cls = cfg.get("tokenizer_class")
    if cls is not None and cls not in KNOWN_TOKENIZERS:
        return [Finding(TOKENIZER.id, Severity.MEDIUM, path, "tokenizer_class",
                        f"tokenizer_class {str(cls)[:80]!r} is not a CLIP tokenizer", {"class": str(cls)[:200]})]
    return []


def _too_large(path: str, size: int) -> Finding:
    cap = _cap(path)
    return Finding(TOO_LARGE.id, Severity.MEDIUM, path, "", f"{size} bytes, over the {cap}-byte cap "
                   f"for this kind of file; not parsed", {"size": size, "cap": cap})


def scan_json(path: str, raw: bytes) -> list[Finding]:
    """All findings for one JSON file."""
    if len(raw) > _cap(path):
        return [_too_large(path, len(raw))]
    try:
        value, dups, consts = parse_json(raw)
    except (ValueError, RecursionError) as exc:
        return [Finding(INVALID.id, Severity.MEDIUM, path, "", f"not valid JSON: {str(exc)[:160]}",
                        {"error": str(exc)[:400]})]
    out: list[Finding] = []
    if dups:
        out.append(Finding(NONSTANDARD.id, Severity.MEDIUM, path, sorted(set(dups))[0],
                           f"duplicate keys {sorted(set(dups))[:10]}: parsers disagree on which value wins",
                           {"duplicate_keys": sorted(set(dups))[:50]}))
    if consts:
        out.append(Finding(NONSTANDARD.id, Severity.LOW, path, "", f"non-standard JSON constants "
                           f"{sorted(set(consts))}", {"constants": sorted(set(consts))}))
    out += _remote_code(path, value)
    base = posixpath.basename(path)
    if base == "scheduler_config.json":
        out += _scheduler(path, value)
    elif path == "model_index.json":
        out += _model_index(path, value)
    elif base == "tokenizer_config.json":
        out += _tokenizer_config(path, value)
    return out


@file_rule("*.json")
def json_rule(ctx: ScanContext, path: str, blob: Blob) -> list[Finding]:
    if blob.size > _cap(path):            # judged by size before copying anything
        return [_too_large(path, blob.size)]
    return scan_json(path, blob.bytes())


def scan_code_file(path: str, data: Any) -> list[Finding]:
    ext = posixpath.splitext(path)[1].lower()
    head = bytes(data[:4])
    if ext in NATIVE_EXTS or head in _NATIVE_MAGIC:
        return [Finding(CODE_FILE.id, Severity.HIGH, path, "", "native library / executable in the model "
                        "repository", {"magic": head.hex(), "extension": ext})]
    if ext in SCRIPT_EXTS or head[:2] == b"#!":
        return [Finding(CODE_FILE.id, Severity.MEDIUM, path, "", "program code in the model repository",
                        {"extension": ext})]
    return []


@file_rule("*")
def code_file_rule(ctx: ScanContext, path: str, blob: Blob) -> list[Finding]:
    return scan_code_file(path, blob.data)
