"""SD 1.5 pipeline end to end on the embedded tiny model, at 128x128 (16x16 latents, UNet batch 2: the
shapes the engine tests compile, so MAX's compile cache is shared), on onnxruntime and on MAX.

Tolerance MAX vs onnxruntime (same seed, 10 PNDM steps): final latents within 1e-4 of their scale, images
within 2/255 per pixel. Measured (PNDM/DDIM/Euler, 10 and 25 steps): latents max abs diff 2.7e-5..8.4e-5
on values up to ~67 (~1e-6 relative), images off by at most 1/255 on ~0.01% of values; text encoder
hidden states 1.4e-6. MAX run twice with the same seed: bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_helpers import EMBEDDED_DIR, REPO_ROOT, verified_from_dir

from sdsecure.errors import UserError
from sdsecure.pipeline.sd15 import StableDiffusion15

SIZE = 128
PROMPT = "a photo of an astronaut riding a horse on mars"


@pytest.fixture(scope="module")
def model():
    return verified_from_dir(EMBEDDED_DIR, "embedded")


@pytest.fixture(scope="module")
def ort_pipe(model):
    return StableDiffusion15(model, backend="onnxruntime", height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def max_pipe(model):
    return StableDiffusion15(model, backend="max", height=SIZE, width=SIZE)


# -- construction ----------------------------------------------------------------------------------

def test_shapes_follow_the_graphs(ort_pipe):
    assert ort_pipe.input_shapes == {
        "text_encoder": {"input_ids": [2, 77]},
        "unet": {"sample": [2, 4, 16, 16], "timestep": [1], "encoder_hidden_states": [2, 77, 16]},
        "vae_decoder": {"latent_sample": [1, 4, 16, 16]},
    }
    assert ort_pipe.scheduler_name == "PNDMScheduler"        # the model's scheduler_config.json
    assert ort_pipe._timestep.dtype == np.float32            # the export's declared timestep type


@pytest.mark.parametrize("h, w, message", [(100, 128, "height must be a positive multiple of 8"),
                                            (128, 0, "width must be a positive multiple of 8"),
                                            (-8, 128, "height must be a positive multiple of 8"),
                                            (128, 96, "width must be a multiple of 64 .* try 128"),
                                            (128, 4096, "width 4096 is larger than 2048")])
def test_bad_sizes(model, h, w, message):
    with pytest.raises(UserError, match=message):
        StableDiffusion15(model, backend="onnxruntime", height=h, width=w)


def test_non_square_size(model):
    pipe = StableDiffusion15(model, backend="onnxruntime", height=64, width=192)
    img = pipe.generate(PROMPT, num_steps=2, seed=0, progress=False)
    assert img.shape == (64, 192, 3)


def test_unknown_scheduler(model):
    with pytest.raises(UserError, match="unknown scheduler"):
        StableDiffusion15(model, backend="onnxruntime", height=SIZE, width=SIZE, scheduler="lms")


@pytest.mark.parametrize("missing", ["vae_decoder/model.onnx", "unet/model.onnx", "tokenizer/vocab.json",
                                     "scheduler/scheduler_config.json"])
def test_missing_component(missing):
    m = verified_from_dir(EMBEDDED_DIR, skip=(missing,))
    with pytest.raises(UserError, match=f"not a complete SD 1.5 ONNX pipeline: missing {missing}"):
        StableDiffusion15(m, backend="onnxruntime", height=SIZE, width=SIZE)


@pytest.mark.parametrize("data, message", [(b"{oops", "not valid JSON"),
                                           (b'{"_class_name": "FlowMatchEulerDiscreteScheduler"}', "allowlist")])
def test_bad_scheduler_config(data, message):
    m = verified_from_dir(EMBEDDED_DIR, replace={"scheduler/scheduler_config.json": data})
    with pytest.raises(UserError, match=message):
        StableDiffusion15(m, backend="onnxruntime", height=SIZE, width=SIZE)


# -- onnxruntime -----------------------------------------------------------------------------------

def test_generate_on_onnxruntime(ort_pipe):
    calls: list[tuple[int, int]] = []
    img = ort_pipe.generate(PROMPT, num_steps=5, seed=0, progress=lambda i, n: calls.append((i, n)))
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert img.std() > 5                              # a picture, not a constant
    assert calls == [(i, 6) for i in range(1, 7)]     # PLMS: 5 steps = 6 UNet calls, as in diffusers
    again = ort_pipe.generate(PROMPT, num_steps=5, seed=0, progress=False)
    np.testing.assert_array_equal(img, again)         # seed 0 is a seed: same image
    other = ort_pipe.generate(PROMPT, num_steps=5, seed=1, progress=False)
    assert np.abs(other.astype(int) - img).mean() > 1


def test_prompt_negative_prompt_and_guidance_matter(ort_pipe):
    base = ort_pipe.generate(PROMPT, num_steps=3, seed=3, progress=False)
    for kwargs in ({"negative_prompt": "blurry"}, {"guidance_scale": 1.0}):
        other = ort_pipe.generate(PROMPT, num_steps=3, seed=3, progress=False, **kwargs)
        assert not np.array_equal(base, other), kwargs
    other = ort_pipe.generate("a photo of a cat", num_steps=3, seed=3, progress=False)
    assert not np.array_equal(base, other)


def test_cfg_matches_the_formula(ort_pipe):
    """hidden states are [uncond, cond]; guidance 0 gives the unconditional image, whatever the prompt."""
    a = ort_pipe.generate(PROMPT, negative_prompt="x", num_steps=3, seed=5, guidance_scale=0.0, progress=False)
    b = ort_pipe.generate("a cat", negative_prompt="x", num_steps=3, seed=5, guidance_scale=0.0, progress=False)
    np.testing.assert_array_equal(a, b)
    hidden = ort_pipe.encode(PROMPT, "x")
    assert hidden.shape == (2, 77, 16)
    np.testing.assert_array_equal(hidden[0], ort_pipe.encode("a cat", "x")[0])


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_scheduler_override(model, ort_pipe, scheduler):
    pipe = StableDiffusion15(model, backend="onnxruntime", height=SIZE, width=SIZE, scheduler=scheduler)
    assert pipe.scheduler_name == {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[scheduler]
    img = pipe.generate(PROMPT, num_steps=4, seed=0, progress=False)
    assert img.shape == (SIZE, SIZE, 3)
    assert not np.array_equal(img, ort_pipe.generate(PROMPT, num_steps=4, seed=0, progress=False))


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"num_steps": 0}, "number of steps"),
    ({"num_steps": -3}, "number of steps"),
    ({"guidance_scale": float("nan")}, "guidance scale"),
    ({"seed": -1}, "seed"),
])
def test_generate_argument_errors(ort_pipe, kwargs, message):
    args = {"prompt": PROMPT, "num_steps": 2, "progress": False, **kwargs}
    with pytest.raises(UserError, match=message):
        ort_pipe.generate(**args)


def test_dynamo_export_gives_the_same_image(ort_pipe):
    """The dynamo (opset 20) fixture has the same weights as the legacy export: same image."""
    dynamo = verified_from_dir(REPO_ROOT / "tests" / "fixtures" / "tiny-sd15-dynamo", "dynamo")
    pipe = StableDiffusion15(dynamo, backend="onnxruntime", height=SIZE, width=SIZE)
    a = ort_pipe.generate(PROMPT, num_steps=4, seed=2, progress=False)
    b = pipe.generate(PROMPT, num_steps=4, seed=2, progress=False)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_initial_noise_is_documented_numpy_rng(ort_pipe):
    noise = ort_pipe.initial_noise(0)
    want = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(noise, want)


# -- MAX -------------------------------------------------------------------------------------------

def test_max_same_seed_same_image_and_close_to_onnxruntime(max_pipe, ort_pipe):
    img = max_pipe.generate(PROMPT, num_steps=10, seed=0, progress=False)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8 and img.std() > 5
    again = max_pipe.generate(PROMPT, num_steps=10, seed=0, progress=False)
    np.testing.assert_array_equal(img, again)

    ref = ort_pipe.generate(PROMPT, num_steps=10, seed=0, progress=False)
    diff = np.abs(img.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"MAX vs onnxruntime: max pixel difference {diff.max()}"

    hidden_max = max_pipe.encode(PROMPT)
    hidden_ort = ort_pipe.encode(PROMPT)
    np.testing.assert_allclose(hidden_max, hidden_ort, atol=1e-4 * max(1.0, float(np.abs(hidden_ort).max())))
    lat_max = max_pipe.denoise(hidden_ort, max_pipe.initial_noise(0), 10, 7.5)
    lat_ort = ort_pipe.denoise(hidden_ort, ort_pipe.initial_noise(0), 10, 7.5)
    scale = max(1.0, float(np.abs(lat_ort).max()))
    assert float(np.abs(lat_max - lat_ort).max()) <= 1e-4 * scale


def test_unsupported_op_in_any_component_is_reported_before_any_compile(monkeypatch):
    """A VAE with an op the MAX importer lacks: the error names the model, node and op, and comes before
    the UNet or anything else is compiled."""
    import onnx
    from onnx import helper

    from sdsecure.engine import runtime
    from sdsecure.errors import UnsupportedOpError

    vae = onnx.load(str(EMBEDDED_DIR / "vae_decoder" / "model.onnx"))
    first = next(n for n in vae.graph.node if "latent_sample" in n.input)
    first.input[list(first.input).index("latent_sample")] = "latent_via_einsum"
    vae.graph.node.insert(0, helper.make_node("Einsum", ["latent_sample"], ["latent_via_einsum"],
                                              equation="abcd->abcd", name="planted_einsum"))
    m = verified_from_dir(EMBEDDED_DIR, replace={"vae_decoder/model.onnx": vae.SerializeToString()})

    def no_compile(*args, **kwargs):
        raise AssertionError("a graph was compiled before every component was checked")

    monkeypatch.setattr(runtime, "_inference_session", no_compile)
    with pytest.raises(UnsupportedOpError, match="vae_decoder.*Einsum.*planted_einsum"):
        StableDiffusion15(m, backend="max", height=SIZE, width=SIZE)


@pytest.mark.parametrize("threshold, expected", [(1, True), (1 << 40, None)])
def test_a_large_pipeline_compiles_every_component_in_child_processes(model, monkeypatch, threshold, expected):
    """Once one component is large, every component compiles outside the process that holds the
    weights (an in-process VAE compile after the UNet's weights were bound peaked at 13 GB)."""
    import sdsecure.engine as engine
    from sdsecure.engine import runtime

    seen, sources = {}, {}

    def record(model_proto, weights, shapes, *, name="", isolate=None, source=None, **kwargs):
        seen[name] = isolate
        sources[name] = source
        return object()

    monkeypatch.setattr(runtime, "ISOLATE_MIN_WEIGHT_BYTES", threshold)
    monkeypatch.setattr(engine, "create_session", record)
    StableDiffusion15(model, backend="max", height=SIZE, width=SIZE)
    assert seen == {"text_encoder": expected, "unet": expected, "vae_decoder": expected}
    # each component names the verified bytes it came from, so that a stored build plan can be reused
    assert sources == {c: model.source_digest(f"{c}/model.onnx") for c in seen}
    assert len(set(sources.values())) == 3


def test_source_digest_names_the_files_of_one_component(model, tmp_path):
    import dataclasses

    from onnx import TensorProto, helper

    from sdsecure.gate.blob import Blob

    unet = model.source_digest("unet/model.onnx")
    assert unet == model.source_digest("unet/model.onnx") != model.source_digest("vae_decoder/model.onnx")
    changed = dict(model.files)
    changed["unet/notes.txt"] = Blob.from_bytes(b"x")                     # a file the graph does not use
    assert dataclasses.replace(model, files=changed).source_digest("unet/model.onnx") == unet
    with pytest.raises(UserError, match="no file"):
        model.source_digest("unet/missing.onnx")

    # a graph whose weights live in another file, even outside its folder: that file's bytes count
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../shared.bin"), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    (tmp_path / "shared.bin").write_bytes(np.ones((4, 4), np.float32).tobytes())
    vm = verified_from_dir(tmp_path)
    before = vm.source_digest("m/model.onnx")
    files = dict(vm.files)
    files["shared.bin"] = Blob.from_bytes(np.full((4, 4), 2, np.float32).tobytes())
    assert dataclasses.replace(vm, files=files, _protos={}).source_digest("m/model.onnx") != before
