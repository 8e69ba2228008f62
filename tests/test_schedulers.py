"""Schedulers vs diffusers 0.42.1 reference outputs (tests/data/schedulers, see its README).

Tolerances (diffusers computes in float32 torch, we use float64 coefficients on float32 samples, so the
two round differently; neither is bit-exact against the other):
- the 5 chained steps, elementwise: |ours - ref| <= 1e-5 + 1e-5 * |ref| (measured ratio <= 0.4);
- full runs (25/50 steps, samples reach |x| ~ 60 where one float32 ulp is 4e-6, and small elements come
  from cancelling large terms): max |ours - ref| <= 1e-5 * max(1, max |ref|) per array. Measured: at most
  7.6e-7 of the array's scale (3.2e-5 absolute, ddim_steps50), the reference README's own float64
  re-derivation reports the same order (<= 5e-5 absolute, 1e-6 relative).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from sdsecure.errors import UserError
from sdsecure.pipeline.schedulers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, check_override,
                                          scheduler_from_config)

DATA = Path(__file__).parent / "data" / "schedulers"
FILES = ["pndm_steps25.npz", "pndm_steps50.npz", "ddim_steps25.npz", "ddim_steps50.npz",
         "euler_steps25.npz", "euler_steps50.npz"]
SHORT = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}
RTOL = ATOL = 1e-5

# SD 1.5's scheduler/scheduler_config.json, as on the Hub
SD15_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}


def load(name: str) -> dict[str, np.ndarray]:
    path = DATA / name
    assert path.is_file(), f"reference file {path} is missing (copy of shared/reference/schedulers)"
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL, err_msg=what)


def close_to_scale(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32, what
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def build(ref: dict[str, np.ndarray], how: str):
    """'override': SD 1.5's config + --scheduler NAME (diffusers' Cls.from_config(sd15_config));
    'resolved': the fully resolved config stored in the reference file."""
    resolved = json.loads(str(ref["resolved_config_json"]))
    if how == "override":
        return scheduler_from_config(SD15_CONFIG, override=SHORT[resolved["_class_name"]])
    return scheduler_from_config(resolved)


def steps_of(name: str) -> int:
    return int(name.split("steps")[1].split(".")[0])


def test_reference_copy_is_intact():
    readme = (DATA / "README.md").read_text()
    for name in FILES + ["manifest.json"]:
        digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        assert f"| {name} | `{digest}` |" in readme, f"{name} differs from the copy recorded in README.md"
    manifest = json.loads((DATA / "manifest.json").read_text())
    assert sorted(manifest) == sorted(FILES)


@pytest.mark.parametrize("how", ["override", "resolved"])
@pytest.mark.parametrize("name", FILES)
def test_timesteps_and_constants(name: str, how: str):
    ref = load(name)
    s = build(ref, how)
    s.set_timesteps(steps_of(name))
    assert s.timesteps.dtype == ref["timesteps"].dtype
    np.testing.assert_array_equal(s.timesteps, ref["timesteps"])
    np.testing.assert_allclose(s.alphas_cumprod, ref["alphas_cumprod"], rtol=1e-6, atol=1e-7)
    assert s.init_noise_sigma == pytest.approx(float(ref["init_noise_sigma"]), rel=1e-6)
    if "sigmas" in ref:
        np.testing.assert_allclose(s.sigmas, ref["sigmas"], rtol=1e-6)
        assert s.sigmas[-1] == 0.0
    if "final_alpha_cumprod" in ref:
        assert s.final_alpha_cumprod == pytest.approx(float(ref["final_alpha_cumprod"]), rel=1e-6)
    if "plms_timesteps" in ref:
        np.testing.assert_array_equal(s.plms_timesteps, ref["plms_timesteps"])
        assert len(s.prk_timesteps) == int(ref["prk_timesteps_len"])


@pytest.mark.parametrize("name", FILES)
def test_five_chained_steps(name: str):
    ref = load(name)
    s = build(ref, "override")
    s.set_timesteps(steps_of(name))
    x = ref["sample0"]
    for i in range(5):
        t = s.timesteps[i]
        close(s.scale_model_input(x, t), ref["scaled_model_inputs"][i], f"{name} scaled input {i}")
        out = s.step(ref["model_outputs"][i], t, x)
        close(out.prev_sample, ref["prev_samples"][i], f"{name} prev_sample {i}")
        if "pred_original_samples" in ref:
            close(out.pred_original_sample, ref["pred_original_samples"][i], f"{name} pred_original {i}")
        else:
            assert out.pred_original_sample is None
        x = out.prev_sample


@pytest.mark.parametrize("name", FILES)
def test_full_run(name: str):
    ref = load(name)
    s = build(ref, "resolved")
    s.set_timesteps(steps_of(name))
    x = ref["sample0"]
    assert len(ref["full_model_outputs"]) == len(s.timesteps)
    for i, t in enumerate(s.timesteps):
        s.scale_model_input(x, t)
        out = s.step(ref["full_model_outputs"][i], t, x)
        close_to_scale(out.prev_sample, ref["full_prev_samples"][i], f"{name} full prev_sample {i} (t={t})")
        if "full_pred_original_samples" in ref:
            close_to_scale(out.pred_original_sample, ref["full_pred_original_samples"][i], f"{name} full pred_original {i}")
        x = out.prev_sample


def test_set_timesteps_resets_state():
    """A second run on the same object gives the same result (PLMS history and Euler's step index reset)."""
    ref = load("pndm_steps25.npz")
    for kind in ("pndm", "euler"):
        s = scheduler_from_config(SD15_CONFIG, override=kind)
        results = []
        for _ in range(2):
            s.set_timesteps(25)
            x = ref["sample0"]
            for i, t in enumerate(s.timesteps[:5]):
                x = s.step(ref["model_outputs"][i], t, s.scale_model_input(x, t)).prev_sample
            results.append(x)
        np.testing.assert_array_equal(results[0], results[1])


def test_class_from_config_and_defaults():
    assert isinstance(scheduler_from_config(SD15_CONFIG), PNDMScheduler)
    ddim = scheduler_from_config(SD15_CONFIG, override="ddim")
    assert isinstance(ddim, DDIMScheduler)
    assert ddim.config["clip_sample"] is False and ddim.config["set_alpha_to_one"] is False  # from the file
    assert ddim.config["timestep_spacing"] == "leading"                                      # class default
    euler = scheduler_from_config(SD15_CONFIG, override="EulerDiscreteScheduler")
    assert isinstance(euler, EulerDiscreteScheduler) and euler.config["timestep_spacing"] == "linspace"
    # keys listed in _use_default_values take the class default, as in diffusers
    saved = dict(SD15_CONFIG, timestep_spacing="leading", _use_default_values=["timestep_spacing"])
    assert scheduler_from_config(saved, override="euler").config["timestep_spacing"] == "linspace"
    assert scheduler_from_config(dict(SD15_CONFIG, timestep_spacing="leading"), override="euler").config[
        "timestep_spacing"] == "leading"


@pytest.mark.parametrize("config, override, message", [
    (dict(SD15_CONFIG, _class_name="LMSDiscreteScheduler"), None, "not supported"),
    (dict(SD15_CONFIG, _class_name="os.system"), None, "allowlist"),
    ({k: v for k, v in SD15_CONFIG.items() if k != "_class_name"}, None, "not supported"),
    (SD15_CONFIG, "dpm++", "unknown scheduler"),
    (dict(SD15_CONFIG, beta_schedule="sigmoid"), None, "beta_schedule"),
    (dict(SD15_CONFIG, prediction_type="sample"), None, "prediction_type"),
    (dict(SD15_CONFIG, timestep_spacing="random"), None, "timestep_spacing"),
    (dict(SD15_CONFIG, use_karras_sigmas=True), "euler", "use_karras_sigmas"),
    (dict(SD15_CONFIG, thresholding=True), "ddim", "thresholding"),
    (dict(SD15_CONFIG, num_train_timesteps=10**9), None, "num_train_timesteps"),
    (dict(SD15_CONFIG, num_train_timesteps="1000"), None, "num_train_timesteps"),
    (dict(SD15_CONFIG, trained_betas=[0.5, 0.5]), None, "trained_betas"),
    ([1, 2], None, "JSON object"),
])
def test_bad_configs_are_user_errors(config, override, message):
    with pytest.raises(UserError, match=message):
        scheduler_from_config(config, override=override)


def test_bad_step_counts():
    s = scheduler_from_config(SD15_CONFIG)
    for n in (0, -1, 1001):
        with pytest.raises(UserError, match="number of steps"):
            s.set_timesteps(n)
    with pytest.raises(UserError, match="at least 2"):
        s.set_timesteps(1)   # PLMS repeats the second timestep: one step is not defined
    ddim = scheduler_from_config(SD15_CONFIG, override="ddim")
    ddim.set_timesteps(1)
    np.testing.assert_array_equal(ddim.timesteps, [1])


def test_check_override():
    assert check_override(None) is None
    assert check_override("PNDM") == "PNDMScheduler"
    assert check_override("ddimscheduler") == "DDIMScheduler"
    with pytest.raises(UserError, match="choose one of pndm, ddim, euler"):
        check_override("lms")


EXTRA = DATA / "extra_refs.npz"
EXTRA_CASES = ["pndm_prk_leading_10", "pndm_linspace_vpred_10", "ddim_trailing_vpred_clip_10",
               "ddim_linspace_linear_sample_10", "euler_leading_vpred_10", "euler_trailing_cos_sigmamin_10"]


@pytest.mark.parametrize("case", EXTRA_CASES)
def test_options_beyond_sd15(case: str):
    """Options SD 1.5's config does not use, against diffusers 0.42.1 (extra_refs.npz, made by
    make_extra_refs.py beside it): PRK warm-up, other spacings, v/sample prediction, other betas."""
    with np.load(EXTRA) as d:
        ref = {k.split("/", 1)[1]: d[k] for k in d.files if k.startswith(case + "/")}
    assert ref, f"{case} missing from {EXTRA}"
    s = scheduler_from_config(json.loads(str(ref["config"])))
    s.set_timesteps(int(case.rsplit("_", 1)[1]))
    assert s.timesteps.dtype == ref["timesteps"].dtype
    np.testing.assert_array_equal(s.timesteps, ref["timesteps"])
    assert s.init_noise_sigma == pytest.approx(float(ref["init_noise_sigma"]), rel=1e-6)
    x = ref["sample0"]
    for i, t in enumerate(s.timesteps):
        close(s.scale_model_input(x, t), ref["scaled_model_inputs"][i], f"{case} scaled input {i}")
        out = s.step(ref["model_outputs"][i], t, x)
        close_to_scale(out.prev_sample, ref["prev_samples"][i], f"{case} prev_sample {i} (t={t})")
        if "pred_original_samples" in ref:
            close_to_scale(out.pred_original_sample, ref["pred_original_samples"][i], f"{case} pred_original {i}")
        x = out.prev_sample
