#!/usr/bin/env python3
"""Regenerate extra_refs.npz: diffusers outputs for scheduler options SD 1.5's own config does not use
(PNDM with Runge-Kutta warm-up steps, trailing/linspace spacing, v-prediction, set_alpha_to_one,
clip_sample), so tests/test_schedulers.py covers those code paths too. Needs diffusers + torch (the
`fixtures` extra); the test only reads the .npz.

    python tests/data/schedulers/make_extra_refs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SD15 = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False,
        "skip_prk_steps": True}
CASES = {
    "pndm_prk_leading_10": dict(SD15, _class_name="PNDMScheduler", skip_prk_steps=False),
    "pndm_linspace_vpred_10": dict(SD15, _class_name="PNDMScheduler", timestep_spacing="linspace",
                                   prediction_type="v_prediction"),
    "ddim_trailing_vpred_clip_10": dict(SD15, _class_name="DDIMScheduler", timestep_spacing="trailing",
                                        prediction_type="v_prediction", set_alpha_to_one=True, clip_sample=True),
    "ddim_linspace_linear_sample_10": dict(SD15, _class_name="DDIMScheduler", timestep_spacing="linspace",
                                           beta_schedule="linear", prediction_type="sample"),
    "euler_leading_vpred_10": dict(SD15, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                                   prediction_type="v_prediction"),
    "euler_trailing_cos_sigmamin_10": dict(SD15, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                                           beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"),
}


def main() -> None:
    import diffusers
    import torch

    out: dict[str, np.ndarray] = {}
    for name, cfg in CASES.items():
        steps = int(name.rsplit("_", 1)[1])
        s = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        s.set_timesteps(steps)
        rng = np.random.default_rng(list(CASES).index(name) + 7)
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        outs = rng.standard_normal((len(s.timesteps), 1, 4, 8, 8)).astype(np.float32)
        prev, pred, scaled = [], [], []
        xt = torch.from_numpy(x.copy())
        for i, t in enumerate(s.timesteps):
            scaled.append(s.scale_model_input(xt, t).numpy().copy())
            o = s.step(torch.from_numpy(outs[i]), t, xt)
            xt = o.prev_sample
            prev.append(xt.numpy().copy())
            if getattr(o, "pred_original_sample", None) is not None:
                pred.append(o.pred_original_sample.numpy().copy())
        out[f"{name}/config"] = np.array(json.dumps(cfg))
        out[f"{name}/timesteps"] = s.timesteps.numpy()
        out[f"{name}/init_noise_sigma"] = np.array(float(s.init_noise_sigma))
        out[f"{name}/sample0"] = x
        out[f"{name}/model_outputs"] = outs
        out[f"{name}/scaled_model_inputs"] = np.stack(scaled)
        out[f"{name}/prev_samples"] = np.stack(prev)
        if pred:
            out[f"{name}/pred_original_samples"] = np.stack(pred)
    out["versions"] = np.array(json.dumps({"diffusers": diffusers.__version__, "torch": torch.__version__,
                                           "numpy": np.__version__}))
    path = Path(__file__).with_name("extra_refs.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
