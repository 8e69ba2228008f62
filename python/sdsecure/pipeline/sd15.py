"""Stable Diffusion 1.5 text-to-image on a VerifiedModel: encode -> denoise with CFG -> decode.

    sd = StableDiffusion15(gate.validate("embedded"), backend="max", height=512, width=512)
    image = sd.generate("a photo of an astronaut riding a horse on mars", seed=0)   # (H, W, 3) uint8

The three ONNX components run through `sdsecure.engine.create_session`, each compiled once per
pipeline object for its concrete shapes: text encoder [2, 77], UNet at batch 2 (classifier-free
guidance: [unconditional, conditional]), VAE decoder at batch 1. Nothing here opens a model file: the
graphs, weights, tokenizer files and scheduler config all come from the VerifiedModel.

Seeds: the initial latents are `numpy.random.default_rng(seed).standard_normal((1, 4, h/8, w/8))` cast
to float32. This is reproducible here, across runs and backends, but it is not torch's RNG: a seed does
not reproduce the image diffusers would make with `torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np

from sdsecure.errors import UserError
from sdsecure.gate.verified import COMPONENT_FILES, VerifiedModel
from sdsecure.pipeline.schedulers import Scheduler, check_override, scheduler_from_config
from sdsecure.pipeline.tokenizer import MAX_LENGTH, PromptTokenizer

LATENT_SCALE = 0.18215          # SD 1.x VAE scaling factor
CFG_BATCH = 2
MAX_SIDE = 2048
SIDE_MULTIPLE = 64             # 8 (VAE) x 2^3 (UNet down-sampling)
MAX_STEPS = 1000
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt")
# Components whose MatMul weights are packed once (engine.packed_matmul). Measured on the full-size export,
# 2 cores: the text encoder ran 0.130-0.140 s against 0.147-0.150 s; the UNet step 2.5-4% slower packed,
# so it is left to MAX; the VAE decoder has no MatMul that qualifies.
PACKED_MATMUL_COMPONENTS = frozenset({"text_encoder"})

ProgressFn = Callable[[int, int], None]
Progress = Union[ProgressFn, bool, None]

# ONNX TensorProto element type -> numpy dtype, for the graph inputs we feed
_ONNX_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


def check_size(height: int, width: int) -> tuple[int, int]:
    """Image sides: multiples of 8 (the VAE's factor), and of 64 because SD 1.5's UNet halves the latent
    three times and its ONNX exports concatenate skip connections of exactly twice the size (a 96-pixel
    side fails inside the graph: latents 12 -> 6 -> 3 -> 2, upsampled to 4 against 3)."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise UserError(f"{name} must be an integer, got {v!r}")
        if v <= 0 or v % 8:
            raise UserError(f"{name} must be a positive multiple of 8, got {v}")
        if v % SIDE_MULTIPLE:
            raise UserError(f"{name} must be a multiple of {SIDE_MULTIPLE} (SD 1.5's UNet halves the {v // 8}-wide "
                            f"latent three times), got {v}: try {max(SIDE_MULTIPLE, round(v / SIDE_MULTIPLE) * SIDE_MULTIPLE)}")
        if v > MAX_SIDE:
            raise UserError(f"{name} {v} is larger than {MAX_SIDE}")
    return int(height), int(width)


def check_generate_args(prompt: str, negative_prompt: str, num_steps: int, guidance_scale: float, seed: int) -> None:
    """The user-facing checks of generate(), callable before any slow work (the CLI does)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty")
    if not isinstance(negative_prompt, str):
        raise UserError("the negative prompt must be text")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= MAX_STEPS:
        raise UserError(f"number of steps must be an integer in 1..{MAX_STEPS}, got {num_steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= 100:
        raise UserError(f"guidance scale must be a number in 0..100, got {guidance_scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer in 0..2^63-1, got {seed!r}")


def check_components(model: VerifiedModel) -> None:
    """Every file the pipeline needs is part of the verified model (one clear error otherwise)."""
    needed = [*COMPONENT_FILES.values(), *TOKENIZER_FILES, SCHEDULER_CONFIG]
    missing = [p for p in needed if not model.has(p)]
    if missing:
        raise UserError(f"model {model.ref!r} is not a complete SD 1.5 ONNX pipeline: missing {', '.join(missing)}")


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]      # int: fixed; str: symbolic name; None: unknown


def graph_inputs(proto: Any) -> dict[str, GraphInput]:
    """The real inputs of an ONNX graph (initializers listed as inputs by old exporters excluded)."""
    inits = {t.name for t in proto.graph.initializer}
    out: dict[str, GraphInput] = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in _ONNX_DTYPES:
            raise UserError(f"graph input {vi.name!r} has an unsupported element type {tt.elem_type}")
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = GraphInput(vi.name, np.dtype(_ONNX_DTYPES[tt.elem_type]), tuple(dims))
    return out


def _pick(inputs: dict[str, GraphInput], name: str, position: int, component: str) -> GraphInput:
    """Input by its SD 1.5 export name, else by position (other exporters rename inputs)."""
    if name in inputs:
        return inputs[name]
    items = list(inputs.values())
    if position < len(items):
        return items[position]
    raise UserError(f"{component} graph has no input {name!r}")


def _concrete(gi: GraphInput, wanted: tuple[int, ...], component: str) -> list[int]:
    """`wanted`, checked against the graph's fixed dims (a symbolic dim takes the wanted value)."""
    if len(gi.dims) != len(wanted):
        raise UserError(f"{component} input {gi.name!r} has rank {len(gi.dims)}, expected {len(wanted)} "
                        f"(shape {list(gi.dims)})")
    for have, want in zip(gi.dims, wanted):
        if isinstance(have, int) and have != want:
            raise UserError(f"{component} input {gi.name!r} is fixed to shape {list(gi.dims)}; "
                            f"this pipeline needs {list(wanted)} (check --height/--width)")
    return list(wanted)


def _fixed(gi: GraphInput, axis: int, default: int) -> int:
    d = gi.dims[axis] if axis < len(gi.dims) else None
    return d if isinstance(d, int) and d > 0 else default


def _output(result: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name in result:
        return result[name]
    return next(iter(result.values()))


def _text_progress() -> tuple[ProgressFn, Callable[[], None]]:
    from tqdm import tqdm

    bar: list[Any] = []

    def update(step: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=True))
        bar[0].update(step - bar[0].n)

    def close() -> None:
        if bar:
            bar[0].close()
            bar.clear()

    return update, close


class StableDiffusion15:
    def __init__(self, model: VerifiedModel, *, backend: str = "max", height: int = 512, width: int = 512,
                 scheduler: str | None = None, num_steps: int | None = None):
        """`num_steps`: the steps the caller will ask for, checked against the scheduler here, before the
        compile (minutes when cold) rather than after it (PNDM needs at least 2)."""
        from sdsecure.engine import create_session, prepare

        self.height, self.width = check_size(height, width)
        check_override(scheduler)
        check_components(model)
        self.model = model
        self.backend = backend
        self.scheduler_override = scheduler
        # scheduler and tokenizer first: cheap, and their errors come before any compile
        try:
            self._scheduler_config = model.read_json(SCHEDULER_CONFIG)
        except ValueError as e:   # JSONDecodeError, UnicodeDecodeError
            raise UserError(f"{SCHEDULER_CONFIG} of model {model.ref!r} is not valid JSON: {e}") from None
        self.scheduler: Scheduler = scheduler_from_config(self._scheduler_config, scheduler)
        if num_steps is not None:
            self.scheduler.set_timesteps(num_steps)

        te_proto = model.onnx_model(COMPONENT_FILES["text_encoder"])
        unet_proto = model.onnx_model(COMPONENT_FILES["unet"])
        vae_proto = model.onnx_model(COMPONENT_FILES["vae_decoder"])
        te_in = graph_inputs(te_proto)
        unet_in = graph_inputs(unet_proto)
        vae_in = graph_inputs(vae_proto)

        ids = _pick(te_in, "input_ids", 0, "text_encoder")
        self.seq_len = _fixed(ids, 1, MAX_LENGTH)
        self.tokenizer = PromptTokenizer.from_model(model, max_length=self.seq_len)
        self._ids = ids

        self._sample = _pick(unet_in, "sample", 0, "unet")
        self._timestep = _pick(unet_in, "timestep", 1, "unet")
        self._hidden = _pick(unet_in, "encoder_hidden_states", 2, "unet")
        self._latent = _pick(vae_in, "latent_sample", 0, "vae_decoder")
        channels = _fixed(self._sample, 1, 4)
        hidden_dim = _fixed(self._hidden, 2, 0) or self._text_hidden_dim(te_proto)
        lh, lw = self.height // 8, self.width // 8
        self.latent_shape = (1, channels, lh, lw)

        te_shapes = {ids.name: _concrete(ids, (CFG_BATCH, self.seq_len), "text_encoder")}
        unet_shapes = {
            self._sample.name: _concrete(self._sample, (CFG_BATCH, channels, lh, lw), "unet"),
            self._timestep.name: self._timestep_shape(),
            self._hidden.name: _concrete(self._hidden, (CFG_BATCH, self.seq_len, hidden_dim), "unet"),
        }
        vae_shapes = {self._latent.name: _concrete(self._latent, (1, _fixed(self._latent, 1, channels), lh, lw),
                                                   "vae_decoder")}
        for shapes, inputs, component in ((te_shapes, te_in, "text_encoder"), (unet_shapes, unet_in, "unet"),
                                          (vae_shapes, vae_in, "vae_decoder")):
            extra = set(inputs) - set(shapes)
            if extra:
                raise UserError(f"{component} graph has unexpected inputs {sorted(extra)}")
        self.input_shapes = {"text_encoder": te_shapes, "unet": unet_shapes, "vae_decoder": vae_shapes}

        protos = {"text_encoder": te_proto, "unet": unet_proto, "vae_decoder": vae_proto}
        weights = {c: model.onnx_weights(COMPONENT_FILES[c]) for c in protos}
        prepared: dict[str, Any] = {}
        isolate = None
        if backend == "max":                # every component checked before any (minutes-long) compile
            from sdsecure.engine.runtime import ISOLATE_MIN_WEIGHT_BYTES, weight_bytes

            prepared = {c: prepare(protos[c], weights[c], self.input_shapes[c], name=c,
                                   pack_matmuls=c in PACKED_MATMUL_COMPONENTS) for c in protos}
            # Once this process holds a large model's weights, no compile may run in it: MAX keeps the
            # compiler's memory (GBs, even for the VAE) until the process ends. So all components
            # compile in child processes, or none.
            if sum(weight_bytes(p) for p in prepared.values()) >= ISOLATE_MIN_WEIGHT_BYTES:
                isolate = True

        def session(component: str):
            return create_session(protos[component], weights[component], self.input_shapes[component],
                                  backend=backend, name=component, prepared=prepared.get(component),
                                  isolate=isolate, source=model.source_digest(COMPONENT_FILES[component]))

        self.text_encoder = session("text_encoder")
        self.unet = session("unet")
        self.vae_decoder = session("vae_decoder")

    # -- shapes ----------------------------------------------------------------------------------
    def _timestep_shape(self) -> list[int]:
        """The timestep as the graph declares it: a scalar, or a vector fed as [1] (as diffusers' ONNX
        pipeline does: np.array([t]); the graphs broadcast it) unless its length is fixed."""
        dims = self._timestep.dims
        if len(dims) == 0:
            return []
        if len(dims) == 1:
            return [dims[0]] if isinstance(dims[0], int) else [1]
        raise UserError(f"unet input {self._timestep.name!r} has shape {list(dims)}; expected a scalar or a vector")

    @staticmethod
    def _text_hidden_dim(te_proto: Any) -> int:
        for vi in te_proto.graph.output:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[2].HasField("dim_value"):
                return int(dims[2].dim_value)
        raise UserError("cannot tell the text encoder's hidden size: neither the UNet's encoder_hidden_states "
                        "nor the text encoder's output declares it")

    # -- description for provenance ---------------------------------------------------------------
    @property
    def scheduler_name(self) -> str:
        return self.scheduler.name

    @property
    def device(self) -> str:
        return str(getattr(self.unet, "device", None) or "cpu")

    # -- the pipeline ----------------------------------------------------------------------------
    def encode(self, prompt: str, negative_prompt: str = "") -> np.ndarray:
        """[2, 77, D] hidden states: row 0 the negative (unconditional) prompt, row 1 the prompt."""
        ids = self.tokenizer([negative_prompt, prompt]).astype(self._ids.dtype)
        out = self.text_encoder.run({self._ids.name: ids})
        hidden = _output(out, "last_hidden_state")
        return np.ascontiguousarray(hidden, dtype=self._hidden.dtype)

    def initial_noise(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.standard_normal(self.latent_shape).astype(np.float32)

    def _timestep_feed(self, t: Any) -> np.ndarray:
        # as diffusers' ONNX pipeline: np.array(t, dtype=<the graph's dtype>) (Euler's float t truncates for int64)
        shape = self.input_shapes["unet"][self._timestep.name]
        return np.full(shape, np.asarray(t).astype(self._timestep.dtype), dtype=self._timestep.dtype)

    def denoise(self, hidden: np.ndarray, latents: np.ndarray, num_steps: int, guidance_scale: float,
                progress: ProgressFn | None = None) -> np.ndarray:
        sched = self.scheduler = scheduler_from_config(self._scheduler_config, self.scheduler_override)  # fresh state
        sched.set_timesteps(num_steps)
        latents = latents * np.float32(sched.init_noise_sigma)
        total = len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(np.concatenate([latents] * CFG_BATCH), t)
            out = self.unet.run({self._sample.name: x.astype(self._sample.dtype, copy=False),
                                 self._timestep.name: self._timestep_feed(t),
                                 self._hidden.name: hidden})
            eps = _output(out, "out_sample").astype(np.float32, copy=False)
            uncond, cond = eps[0:1], eps[1:2]
            guided = uncond + np.float32(guidance_scale) * (cond - uncond)
            latents = sched.step(guided, t, latents).prev_sample
            if progress is not None:
                progress(i + 1, total)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        feed = (latents / np.float32(LATENT_SCALE)).astype(self._latent.dtype)
        image = _output(self.vae_decoder.run({self._latent.name: feed}), "sample").astype(np.float32)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        image = (image[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        return np.ascontiguousarray(image)

    def generate(self, prompt: str, negative_prompt: str = "", num_steps: int = 25, guidance_scale: float = 7.5,
                 seed: int = 0, progress: Progress = None) -> np.ndarray:
        """An (H, W, 3) uint8 RGB image. progress: a callback (step, total), None/True for a text bar on
        stderr, False for none."""
        check_generate_args(prompt, negative_prompt, num_steps, guidance_scale, seed)
        close: Callable[[], None] = lambda: None
        if callable(progress):
            report: ProgressFn | None = progress
        elif progress is False:
            report = None
        else:
            report, close = _text_progress()
        try:
            hidden = self.encode(prompt, negative_prompt)
            latents = self.denoise(hidden, self.initial_noise(int(seed)), int(num_steps), float(guidance_scale), report)
        finally:
            close()
        return self.decode(latents)
