"""Noise schedulers in numpy: PNDM (PLMS, SD 1.5's default), DDIM and Euler, matching diffusers 0.42.

Each is built from a `scheduler_config.json` the way diffusers' `from_config` does: the class named by
`_class_name` (from an allowlist), the keys the class knows, class defaults for the rest (and for keys
listed in `_use_default_values`). The same three calls as diffusers:

    s = scheduler_from_config(cfg)            # or scheduler_from_config(cfg, override="euler")
    s.set_timesteps(25)
    x = noise * s.init_noise_sigma
    for t in s.timesteps:
        eps = unet(s.scale_model_input(x, t), t)
        x = s.step(eps, t, x).prev_sample

Arithmetic: diffusers works in float32 torch tensors; here the per-step coefficients are computed in
float64 from the same float32 `alphas_cumprod`, and samples stay float32. Outputs agree with diffusers
0.42.1 to ~1e-6 relative (tests/test_schedulers.py checks every reference file to 1e-5).
Options diffusers has but SD 1.5 never uses (Karras/exponential/beta sigmas, dynamic thresholding,
zero-SNR rescaling, stochastic DDIM/Euler) are refused with a UserError rather than half-supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from sdsecure.errors import UserError

MAX_TRAIN_TIMESTEPS = 10_000       # caps memory a hostile config could ask for
MAX_INFERENCE_STEPS = 1_000


@dataclass
class SchedulerOutput:
    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None


def _betas(cfg: Mapping[str, Any]) -> np.ndarray:
    """float32 betas as diffusers builds them (torch.linspace in float32, then squared for scaled_linear)."""
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        if betas.shape != (n,) or not np.all((betas > 0) & (betas < 1)):
            raise UserError(f"scheduler config: trained_betas must be {n} values in (0, 1)")
        return betas.astype(np.float32)
    schedule = cfg["beta_schedule"]
    start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
    if schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64).astype(np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64).astype(np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                         dtype=np.float32)
    else:
        raise UserError(f"scheduler config: beta_schedule {schedule!r} is not supported "
                        "(linear, scaled_linear, squaredcos_cap_v2)")
    if not np.all((betas > 0) & (betas < 1)):
        raise UserError("scheduler config: betas must lie in (0, 1); check beta_start / beta_end")
    return betas


def _leading_or_trailing(spacing: str, n_train: int, n: int, offset: int) -> np.ndarray:
    """Descending int64 timesteps for 'leading' / 'trailing' (diffusers' formulas)."""
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + offset
    if spacing == "trailing":
        ratio = n_train / n
        return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    raise AssertionError(spacing)


class Scheduler:
    """Shared config handling and the float32 alphas_cumprod. Subclasses: set_timesteps, scale_model_input, step."""

    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]]
    CHOICES: ClassVar[dict[str, tuple]] = {}
    COMMON_CHOICES: ClassVar[dict[str, tuple]] = {
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "prediction_type": ("epsilon", "v_prediction"),
    }

    def __init__(self, **config: Any):
        unknown = set(config) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"{self.name}: unknown option(s) {sorted(unknown)}")
        cfg = {**self.DEFAULTS, **config}
        self._check(cfg)
        self.config: dict[str, Any] = cfg
        betas = _betas(cfg)
        alphas = np.float32(1.0) - betas
        # torch.cumprod accumulates float32 in double on CPU, then stores float32
        self.alphas_cumprod: np.ndarray = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.arange(cfg["num_train_timesteps"])[::-1].astype(np.int64)
        self.init_noise_sigma: float = 1.0

    def _check(self, cfg: dict[str, Any]) -> None:
        n = cfg["num_train_timesteps"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 < n <= MAX_TRAIN_TIMESTEPS:
            raise UserError(f"scheduler config: num_train_timesteps must be an integer in 2..{MAX_TRAIN_TIMESTEPS}")
        for key in ("beta_start", "beta_end"):
            if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool):
                raise UserError(f"scheduler config: {key} must be a number")
        if not isinstance(cfg["steps_offset"], int) or not 0 <= cfg["steps_offset"] < n:
            raise UserError(f"scheduler config: steps_offset must be an integer in 0..{n - 1}")
        for key, allowed in {**self.COMMON_CHOICES, **self.CHOICES}.items():
            if key in cfg and cfg[key] not in allowed:
                raise UserError(f"scheduler config: {self.name} with {key}={cfg[key]!r} is not supported "
                                f"(supported: {', '.join(map(repr, allowed))})")

    def _check_steps(self, n: int) -> None:
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= min(MAX_INFERENCE_STEPS, self.config["num_train_timesteps"]):
            raise UserError(f"number of steps must be in 1..{min(MAX_INFERENCE_STEPS, self.config['num_train_timesteps'])}, got {n}")

    def _alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    # the interface diffusers' pipelines use
    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}(timestep_spacing={self.config['timestep_spacing']})"


_DDPM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods (PNDM); with skip_prk_steps, the linear multistep (PLMS) part only."""

    name = "PNDMScheduler"
    DEFAULTS = {**_DDPM_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False,
                "timestep_spacing": "leading"}
    PNDM_ORDER = 4

    def __init__(self, **config: Any):
        super().__init__(**config)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self._alpha(0)
        self._reset()

    def _reset(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_model_output: np.ndarray | float = 0.0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg, n = self.config, num_inference_steps
        n_train = cfg["num_train_timesteps"]
        self.num_inference_steps = n
        if cfg["timestep_spacing"] == "linspace":
            base = np.linspace(0, n_train - 1, n).round().astype(np.int64)
        else:  # ascending
            base = _leading_or_trailing(cfg["timestep_spacing"], n_train, n, cfg["steps_offset"])[::-1].copy()
        if cfg["skip_prk_steps"]:
            if n < 2:
                raise UserError("PNDM (PLMS) needs at least 2 steps")
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if n < self.PNDM_ORDER:
                raise UserError(f"PNDM with Runge-Kutta warm-up steps needs at least {self.PNDM_ORDER} steps")
            prk = np.array(base[-self.PNDM_ORDER:]).repeat(2) + np.tile(
                np.array([0, n_train // n // 2]), self.PNDM_ORDER)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset()

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() first")
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev = self._step_prk(model_output, int(timestep), sample)
        else:
            prev = self._step_plms(model_output, int(timestep), sample)
        return SchedulerOutput(prev_sample=prev)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        n_train, n = self.config["num_train_timesteps"], self.num_inference_steps
        diff_to_prev = 0 if self.counter % 2 else n_train // n // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0.0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        self.counter += 1
        return self._prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        n_train, n = self.config["num_train_timesteps"], self.num_inference_steps
        prev_timestep = timestep - n_train // n
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + n_train // n
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        return self._prev_sample(sample, timestep, prev_timestep, model_output)

    def _prev_sample(self, sample: np.ndarray, t: int, t_prev: int, model_output: np.ndarray) -> np.ndarray:
        """Formula (9) of the PNDM paper."""
        a_t = self._alpha(t)
        a_prev = self._alpha(t_prev) if t_prev >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = a_t**0.5 * model_output + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (sample_coeff * sample - (a_prev - a_t) * model_output / denom).astype(np.float32)


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models, deterministic (eta = 0)."""

    name = "DDIMScheduler"
    DEFAULTS = {**_DDPM_DEFAULTS, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False,
                "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
                "timestep_spacing": "leading", "rescale_betas_zero_snr": False}
    CHOICES = {"prediction_type": ("epsilon", "v_prediction", "sample"), "thresholding": (False,),
               "rescale_betas_zero_snr": (False,)}

    def __init__(self, **config: Any):
        super().__init__(**config)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self._alpha(0)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg, n = self.config, num_inference_steps
        self.num_inference_steps = n
        if cfg["timestep_spacing"] == "linspace":
            ts = np.linspace(0, cfg["num_train_timesteps"] - 1, n).round()[::-1].astype(np.int64)
        else:
            ts = _leading_or_trailing(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"])
        self.timesteps = ts.copy()

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() first")
        cfg = self.config
        t = int(timestep)
        t_prev = t - cfg["num_train_timesteps"] // self.num_inference_steps
        a_t = self._alpha(t)
        a_prev = self._alpha(t_prev) if t_prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        kind = cfg["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if cfg["clip_sample"]:
            r = float(cfg["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        prev = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps   # eta = 0: no variance term
        return SchedulerOutput(prev_sample=prev.astype(np.float32), pred_original_sample=x0.astype(np.float32))


class EulerDiscreteScheduler(Scheduler):
    """Euler method in sigma space (k-diffusion's sample_euler), deterministic (s_churn = 0)."""

    name = "EulerDiscreteScheduler"
    DEFAULTS = {**_DDPM_DEFAULTS, "interpolation_type": "linear", "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
                "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
                "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"}
    CHOICES = {"prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
               "interpolation_type": ("linear",), "use_karras_sigmas": (False, None),
               "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
               "timestep_type": ("discrete",), "rescale_betas_zero_snr": (False,),
               "final_sigmas_type": ("zero", "sigma_min")}

    def __init__(self, **config: Any):
        super().__init__(**config)
        ac = self.alphas_cumprod
        train_sigmas = (((1 - ac) / ac) ** 0.5)[::-1]
        self.sigmas = np.concatenate([train_sigmas, [0.0]]).astype(np.float32)
        self.timesteps = np.linspace(0, len(ac) - 1, len(ac))[::-1].astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()
        self._step_index: int | None = None

    def _init_noise_sigma(self) -> float:
        max_sigma = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg, n = self.config, num_inference_steps
        n_train = cfg["num_train_timesteps"]
        self.num_inference_steps = n
        if cfg["timestep_spacing"] == "linspace":
            ts = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
        else:
            ts = _leading_or_trailing(cfg["timestep_spacing"], n_train, n, cfg["steps_offset"]).astype(np.float32)
        ac = self.alphas_cumprod
        sigmas = np.interp(ts, np.arange(0, len(ac)), ((1 - ac) / ac) ** 0.5)
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = ts.astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()
        self._step_index = None

    def _index(self, timestep: Any) -> int:
        if self._step_index is None:  # like diffusers: located once, then counted
            hits = np.flatnonzero(self.timesteps == np.float32(timestep))
            if len(hits) == 0:
                raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
            self._step_index = int(hits[1] if len(hits) > 1 else hits[0])
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        sigma = float(self.sigmas[self._index(timestep)])
        return (sample / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> SchedulerOutput:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() first")
        i = self._index(timestep)
        sigma = float(self.sigmas[i])
        kind = self.config["prediction_type"]
        if kind in ("sample", "original_sample"):
            x0 = model_output
        elif kind == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - x0) / sigma
        dt = float(self.sigmas[i + 1]) - sigma
        prev = sample + derivative * dt
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev.astype(np.float32), pred_original_sample=x0.astype(np.float32))


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler)
}
SHORT_NAMES: dict[str, str] = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


def check_override(name: str | None) -> str | None:
    """Validate a user's `--scheduler` value early (before any slow work); returns the class name."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    for cls_name in SCHEDULERS:
        if key == cls_name.lower():
            return cls_name
    raise UserError(f"unknown scheduler {name!r}: choose one of {', '.join(SHORT_NAMES)}")


def scheduler_from_config(config: Mapping[str, Any], override: str | None = None) -> Scheduler:
    """Build the scheduler `config` names (or `override`: pndm | ddim | euler, from the same config),
    as diffusers' `Cls.from_config(config)` does. Unknown classes and unsupported options: UserError."""
    if not isinstance(config, Mapping):
        raise UserError("scheduler config must be a JSON object")
    cls_name = check_override(override) or config.get("_class_name")
    if not isinstance(cls_name, str) or cls_name not in SCHEDULERS:
        raise UserError(f"scheduler {cls_name!r} is not supported: the allowlist is {', '.join(SCHEDULERS)} "
                        "(choose one with --scheduler pndm|ddim|euler)")
    cls = SCHEDULERS[cls_name]
    use_defaults = config.get("_use_default_values") or []
    kwargs = {k: v for k, v in config.items()
              if k in cls.DEFAULTS and not k.startswith("_") and k not in use_defaults}
    return cls(**kwargs)
