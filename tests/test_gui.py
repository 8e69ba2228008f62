"""The streamlit GUI, driven by streamlit's own AppTest (no browser), plus its logic functions.

The GUI must go through the same gate as the CLIs: the planted-backdoor test fails if it skipped it.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from door_samples import TEXT_ENCODER, TRIGGER_NODES, plant_token_trigger
from sdsecure.errors import UserError
from sdsecure.gui.generation import GenerationParams, render_png
from sdsecure.gui.query import parse_query
from sdsecure.gui.validation import ModelKey, Validation, generation_gate, validate_model

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "python" / "stable-diffusion.py")
TIMEOUT = 300   # a validation hashes and analyses every file; a generation compiles three graphs


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return plant_token_trigger(tmp_path_factory.mktemp("gui") / "planted")


def _app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _texts(elements) -> list[str]:
    return [e.value for e in elements]


def _table_rows(at: AppTest) -> list[dict]:
    rows = []
    for t in at.table:
        rows += t.value.to_dict("records")
    return rows


# -- the app ---------------------------------------------------------------------------------------

def test_generation_disabled_before_validation():
    at = _app()
    assert not at.exception
    assert at.text_input(key="model_id").value == "embedded"
    assert at.button(key="generate").disabled
    assert any("Validate the model first" in t for t in _texts(at.info))


def test_validate_embedded_shows_allowed_report_and_enables_generation():
    at = _app()
    at.button(key="validate").click().run()
    assert not at.exception
    assert any(t.startswith("Verdict: ALLOWED for embedded") for t in _texts(at.success)), _texts(at.success)
    assert not at.error
    rows = _table_rows(at)
    files = {r["file"] for r in rows if "sha256" in r}
    assert TEXT_ENCODER in files and "unet/weights.pb" in files
    # nothing at or above the default policy's threshold may be listed for an allowed model
    assert all(r["severity"] != "critical" for r in rows if "severity" in r)
    assert not at.button(key="generate").disabled


def test_planted_backdoor_is_blocked_and_generation_stays_disabled(planted: Path):
    at = _app()
    at.text_input(key="model_id").set_value(str(planted)).run()
    at.button(key="validate").click().run()
    assert not at.exception
    errors = _texts(at.error)
    assert any(t.startswith("Verdict: BLOCKED") for t in errors), errors
    blocking = at.table[0].value.to_dict("records")
    assert any(r["rule"].startswith("BACKDOOR") and r["file"] == TEXT_ENCODER
               and any(n in r["node / where"] for n in TRIGGER_NODES) for r in blocking), blocking
    assert not any(r["rule"] == "LOCK-MISMATCH" for r in blocking), "the lockfile should match: re-locked"
    assert at.button(key="generate").disabled
    assert any("BLOCKED" in t for t in _texts(at.info))


def test_changing_the_model_after_validation_disables_generation(planted: Path):
    at = _app()
    at.button(key="validate").click().run()
    assert not at.button(key="generate").disabled
    at.text_input(key="model_id").set_value(str(planted)).run()
    assert at.button(key="generate").disabled
    assert any("changed since the last validation" in t for t in _texts(at.info))
    at.toggle(key="strict").set_value(True).run()   # back to embedded but strict: still a new key
    at.text_input(key="model_id").set_value("embedded").run()
    assert at.button(key="generate").disabled


def test_query_string_validates_on_load():
    at = _app(model="embedded", validate="1")
    assert not at.exception
    assert any(t.startswith("Verdict: ALLOWED") for t in _texts(at.success))
    assert not at.button(key="generate").disabled


def test_unknown_model_is_an_error_not_a_crash(tmp_path: Path):
    at = _app()
    at.text_input(key="model_id").set_value(str(tmp_path / "nope")).run()
    at.button(key="validate").click().run()
    assert not at.exception
    assert any("COULD NOT CHECK" in t for t in _texts(at.warning))
    assert at.button(key="generate").disabled


def test_generate_on_the_embedded_model_serves_the_png_with_provenance():
    """The whole door: validate (query string), generate on MAX, image shown, download bytes carry the
    same provenance as the CLI's PNG with entry "gui"."""
    from PIL import Image

    at = _app(model="embedded", validate="1")
    at.text_area(key="prompt").set_value("a lighthouse at dusk")
    at.number_input(key="steps").set_value(2)
    at.number_input(key="seed").set_value(5)
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    assert not at.error, _texts(at.error)
    assert len(at.image) == 1
    assert at.download_button(key="download").label.startswith("Download PNG")
    served = at.session_state["image"]
    png = Image.open(io.BytesIO(served.png))
    assert png.size == (128, 128)               # the CLI's default size for the embedded model
    text = png.text
    assert text["sdsecure:entry"] == "gui"
    assert text["sdsecure:verdict"] == "allowed"
    assert (text["sdsecure:prompt"], text["sdsecure:steps"], text["sdsecure:seed"]) == ("a lighthouse at dusk", "2", "5")
    assert text["sdsecure:backend"] == "max"


# -- logic -----------------------------------------------------------------------------------------

def test_generation_gate_rules():
    key = ModelKey.from_inputs("embedded", "", False)
    assert generation_gate(None, key)[0] is False
    assert generation_gate(Validation(key, "allowed"), key) == (True, "")
    assert generation_gate(Validation(key, "blocked"), key)[0] is False
    assert generation_gate(Validation(key, "error", error="x"), key)[0] is False
    assert generation_gate(Validation(key, "allowed"), ModelKey.from_inputs("embedded", "", True))[0] is False
    assert generation_gate(Validation(key, "allowed"), ModelKey.from_inputs("embedded", "abc", False))[0] is False


def test_model_key_normalises_inputs():
    assert ModelKey.from_inputs("  ", " ", True) == ModelKey("embedded", None, "strict")
    assert ModelKey.from_inputs("org/name ", "main", False) == ModelKey("org/name", "main", "default")


def test_parse_query():
    assert parse_query({}) == parse_query({"model": ""})
    req = parse_query({"model": "org/name", "revision": "abc", "strict": "1", "validate": "true"})
    assert (req.model, req.revision, req.strict, req.validate) == ("org/name", "abc", True, True)
    assert parse_query({"validate": "0"}).validate is False


@pytest.mark.parametrize("change, message", [
    ({"prompt": "  "}, "prompt"), ({"num_steps": 0}, "steps"), ({"height": 100}, "height"),
    ({"width": -8}, "width"), ({"seed": -1}, "seed"), ({"guidance_scale": float("nan")}, "guidance"),
    ({"scheduler": "lms"}, "scheduler"),
])
def test_generation_params_are_checked(change: dict, message: str):
    params = GenerationParams(**{"prompt": "a cat", **change})
    with pytest.raises(UserError, match=message):
        params.check()


def test_download_bytes_keep_the_provenance():
    """The served PNG is what save_png writes: the gate's provenance plus the GUI's own."""
    from PIL import Image

    validation = validate_model(ModelKey.from_inputs("embedded", "", False))
    assert validation.verdict == "allowed" and validation.model is not None
    image = (np.arange(16 * 24 * 3) % 256).astype(np.uint8).reshape(16, 24, 3)
    params = GenerationParams(prompt="ein Bild — 画像", seed=7)
    pipe = SimpleNamespace(scheduler_name="PNDMScheduler", device="cpu")   # what provenance reads
    out = render_png(validation.model, image, params, pipe)
    png = Image.open(io.BytesIO(out.png))
    assert png.size == (24, 16)
    assert np.array_equal(np.asarray(png.convert("RGB")), image)
    text = png.text
    assert text["sdsecure:verdict"] == "allowed"
    assert text["sdsecure:model"] == "embedded"
    assert text["sdsecure:entry"] == "gui"
    assert text["sdsecure:prompt"] == "ein Bild — 画像"
    assert text["sdsecure:seed"] == "7"
    assert validation.model.lockfile_sha256
    assert text["sdsecure:lockfile_sha256"] == validation.model.lockfile_sha256
    assert text["sdsecure:scheduler"] == "PNDMScheduler"
    assert out.provenance == text
