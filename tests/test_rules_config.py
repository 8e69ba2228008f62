"""JSON config rules and remote-code vectors: the fixtures' configs pass; each crafted config is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURE_MODEL_DIRS
from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Severity
from sdsecure.gate.rules import _FILE_RULES, RULES, ScanContext
from sdsecure.gate.rules import configs
from sdsecure.gate.rules.configs import load_json, scan_code_file, scan_json

SD_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                "steps_offset": 1, "trained_betas": None}
SD_INDEX = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["diffusers", "OnnxRuntimeModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "OnnxRuntimeModel"],
            "vae_decoder": ["diffusers", "OnnxRuntimeModel"], "vae_encoder": [None, None]}


def scan(path: str, doc) -> list:
    return scan_json(path, json.dumps(doc).encode() if not isinstance(doc, bytes) else doc)


def only(found, rule: str, severity: Severity):
    hits = [f for f in found if f.rule == rule]
    assert hits, [(f.rule, f.message) for f in found]
    assert {f.severity for f in hits} == {severity}, [(f.rule, f.severity, f.message) for f in found]
    return hits[0]


# --- benign -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", sorted(FIXTURE_MODEL_DIRS))
def test_fixture_configs_and_files_pass(fixture):
    root: Path = FIXTURE_MODEL_DIRS[fixture]
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            data = p.read_bytes()
            found = (scan_json(rel, data) if rel.endswith(".json") else []) + scan_code_file(rel, data)
            assert found == [], (rel, found)


@pytest.mark.parametrize("cls", sorted(configs.SUPPORTED_SCHEDULERS))
def test_supported_schedulers_pass(cls):
    assert scan("scheduler/scheduler_config.json", {**SD_SCHEDULER, "_class_name": cls}) == []


def test_sd_model_index_passes():
    assert scan("model_index.json", SD_INDEX) == []


# --- scheduler ----------------------------------------------------------------------------------------

def test_known_but_unsupported_scheduler_is_info():
    f = only(scan("scheduler/scheduler_config.json", {**SD_SCHEDULER, "_class_name": "LMSDiscreteScheduler"}),
             "CONFIG-SCHEDULER-CLASS", Severity.INFO)
    assert f.evidence["class"] == "LMSDiscreteScheduler"


def test_unknown_scheduler_is_high():
    f = only(scan("scheduler/scheduler_config.json", {**SD_SCHEDULER, "_class_name": "EvilScheduler"}),
             "CONFIG-SCHEDULER-CLASS", Severity.HIGH)
    assert f.where == "_class_name"


def test_missing_scheduler_class_is_medium():
    doc = {k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"}
    only(scan("scheduler/scheduler_config.json", doc), "CONFIG-SCHEDULER-CLASS", Severity.MEDIUM)


def test_scheduler_class_as_module_pair_is_remote_code():
    only(scan("scheduler/scheduler_config.json", {**SD_SCHEDULER, "_class_name": ["my_sched", "S"]}),
         "CONFIG-REMOTE-CODE", Severity.HIGH)


def test_timesteps_bomb_is_high():
    f = only(scan("scheduler/scheduler_config.json", {**SD_SCHEDULER, "num_train_timesteps": 10**12}),
             "CONFIG-SCHEDULER-VALUE", Severity.HIGH)
    assert f.where == "num_train_timesteps"


@pytest.mark.parametrize("key,value", [("num_train_timesteps", 0), ("num_train_timesteps", 1.5),
                                       ("beta_start", -0.1), ("beta_end", 2.0), ("beta_schedule", "cosine??"),
                                       ("prediction_type", "x"), ("steps_offset", -1),
                                       ("timestep_spacing", "random"), ("beta_start", 0.5),
                                       ("trained_betas", [0.1, 0.2])])
def test_scheduler_values_out_of_range_are_medium(key, value):
    f = only(scan("scheduler/scheduler_config.json", {**SD_SCHEDULER, key: value}), "CONFIG-SCHEDULER-VALUE",
             Severity.MEDIUM)
    assert f.where == key


# --- model_index --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [["evil_lib", "Backdoor"], ["diffusers", "NotAClass"], ["transformers"],
                                   ["os", "system"], [1, 2]])
def test_unknown_component_is_high(value):
    f = only(scan("model_index.json", {**SD_INDEX, "unet": value}), "CONFIG-UNKNOWN-COMPONENT", Severity.HIGH)
    assert f.where == "unet" and f.evidence["value"] == value


def test_custom_pipeline_class_is_remote_code():
    only(scan("model_index.json", {**SD_INDEX, "_class_name": ["pipeline", "MyPipeline"]}),
         "CONFIG-REMOTE-CODE", Severity.HIGH)


def test_unknown_pipeline_class_is_medium():
    only(scan("model_index.json", {**SD_INDEX, "_class_name": "WeirdPipeline"}), "CONFIG-UNKNOWN-COMPONENT",
         Severity.MEDIUM)


def test_unsupported_scheduler_in_model_index_is_info():
    only(scan("model_index.json", {**SD_INDEX, "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}),
         "CONFIG-SCHEDULER-CLASS", Severity.INFO)


# --- remote code, tokenizer -----------------------------------------------------------------------------

def test_auto_map_in_tokenizer_config_is_high():
    doc = {"tokenizer_class": "CLIPTokenizer", "auto_map": {"AutoTokenizer": ["tok.EvilTokenizer", None]}}
    f = only(scan("tokenizer/tokenizer_config.json", doc), "CONFIG-REMOTE-CODE", Severity.HIGH)
    assert f.where == "auto_map"


def test_nested_auto_map_and_trust_remote_code_are_high():
    found = scan("text_encoder/config.json", {"a": {"auto_map": {"AutoModel": "m.M"}}, "trust_remote_code": True})
    assert sorted(f.where for f in found if f.rule == "CONFIG-REMOTE-CODE") == ["a.auto_map", "trust_remote_code"]


def test_empty_auto_map_and_false_flags_pass():
    assert scan("config.json", {"auto_map": {}, "trust_remote_code": False, "custom_pipeline": None}) == []


def test_non_clip_tokenizer_class_is_medium():
    only(scan("tokenizer/tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"}), "CONFIG-TOKENIZER-CLASS",
         Severity.MEDIUM)


# --- JSON hygiene ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b'{"a": 1,}', b"[" * 100_000 + b"]" * 100_000])
def test_invalid_json_is_medium(raw):
    only(scan_json("model_index.json", raw), "CONFIG-INVALID-JSON", Severity.MEDIUM)


def test_duplicate_keys_are_medium():
    raw = b'{"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "num_train_timesteps": 1e15}'
    found = scan_json("scheduler/scheduler_config.json", raw)
    f = only(found, "CONFIG-NONSTANDARD-JSON", Severity.MEDIUM)
    assert f.evidence["duplicate_keys"] == ["num_train_timesteps"]
    only(found, "CONFIG-SCHEDULER-VALUE", Severity.HIGH)       # Python keeps the last value: a bomb


def test_nan_constants_are_low():
    f = only(scan_json("unet/config.json", b'{"x": NaN, "y": -Infinity}'), "CONFIG-NONSTANDARD-JSON", Severity.LOW)
    assert f.evidence["constants"] == ["-Infinity", "NaN"]


def test_oversized_config_is_not_parsed():
    raw = b'{"pad": "' + b"x" * configs.CONFIG_CAP + b'"}'
    found = scan_json("model_index.json", raw)
    assert [(f.rule, f.severity) for f in found] == [("CONFIG-TOO-LARGE", Severity.MEDIUM)]
    # a vocabulary may be bigger than a config, up to its own cap
    assert scan_json("tokenizer/vocab.json", raw) == []


def test_json_rule_checks_size_before_reading_and_load_json_shares_the_parse():
    big = Blob.from_bytes(b"{" + b" " * (configs.CONFIG_CAP + 10) + b"}")
    good = Blob.from_bytes(json.dumps(SD_INDEX).encode())
    ctx = ScanContext("x", {"model_index.json": good, "unet/config.json": big}, True)
    assert configs.json_rule(ctx, "unet/config.json", big)[0].rule == "CONFIG-TOO-LARGE"
    assert load_json(ctx, "unet/config.json") is None
    assert load_json(ctx, "model_index.json")["unet"] == ["diffusers", "OnnxRuntimeModel"]
    assert ("json", "model_index.json") in ctx.cache


# --- code files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,data,severity", [
    ("unet/modeling_unet.py", b"import os\n", Severity.MEDIUM),
    ("setup.sh", b"echo hi\n", Severity.MEDIUM),
    ("tools/run", b"#!/bin/sh\nid\n", Severity.MEDIUM),
    ("custom_ops.so", b"anything", Severity.HIGH),
    ("unet/weights.pb", b"\x7fELF\x02\x01\x01" + bytes(100), Severity.HIGH),   # ELF under a weight name
    ("lib.dylib", b"\xcf\xfa\xed\xfe", Severity.HIGH),
])
def test_code_files_are_flagged(path, data, severity):
    only(scan_code_file(path, data), "CONFIG-CODE-FILE", severity)


@pytest.mark.parametrize("path,data", [("README.md", b"# model\n"), ("unet/weights.pb", bytes(64)),
                                        ("tokenizer/merges.txt", b"#version: 0.2\n")])
def test_data_files_are_not_code(path, data):
    assert scan_code_file(path, data) == []


def test_rules_registered_and_declared():
    assert any(fn is configs.json_rule and pats == ("*.json",) for pats, fn in _FILE_RULES)
    assert any(fn is configs.code_file_rule and pats == ("*",) for pats, fn in _FILE_RULES)
    for rid in ("CONFIG-TOO-LARGE", "CONFIG-INVALID-JSON", "CONFIG-NONSTANDARD-JSON", "CONFIG-SCHEDULER-CLASS",
                "CONFIG-SCHEDULER-VALUE", "CONFIG-UNKNOWN-COMPONENT", "CONFIG-REMOTE-CODE",
                "CONFIG-TOKENIZER-CLASS", "CONFIG-CODE-FILE"):
        assert len(RULES[rid].why) > 60 and RULES[rid].fix
