"""sdsecure GUI: validate a Stable Diffusion 1.5 ONNX model with the security gate, then generate.

    streamlit run python/stable-diffusion.py --server.address 127.0.0.1
    http://127.0.0.1:8501/?model=embedded&validate=1     # opens with a model already validated

Only layout lives here; the logic is in sdsecure.gui (tested without a browser). Generation stays
disabled until the gate has allowed exactly the model, revision and policy currently selected.
"""

from __future__ import annotations

import streamlit as st

from sdsecure.cli.generate import DEFAULT_MODEL, DEFAULT_SIZE, EMBEDDED_SIZE
from sdsecure.errors import UserError
from sdsecure.gui.generation import SCHEDULERS, GenerationParams, build_pipeline, generate
from sdsecure.gui.query import parse_query
from sdsecure.gui.validation import (ModelKey, blocking_rows, file_rows, finding_rows, generation_gate,
                                     validate_model, verdict_line)

st.set_page_config(page_title="sdsecure: Stable Diffusion 1.5 behind a security gate", layout="wide")
state = st.session_state

# -- first load: defaults from the query string (?model=...&revision=...&strict=1&validate=1) ----------
if "validation" not in state:
    request = parse_query(st.query_params)
    state.model_id, state.revision, state.strict = request.model, request.revision, request.strict
    state.height = state.width = EMBEDDED_SIZE if request.model == DEFAULT_MODEL else DEFAULT_SIZE
    state.validation = None
    state.image = None
    state.pipeline = None
    state.validate_on_load = request.validate

st.title("sdsecure: Stable Diffusion 1.5 on MAX")
st.caption("Every model passes the same security gate as the command line before anything runs.")

# -- 1. model and validation ------------------------------------------------------------------------
st.header("1. Model")
col_id, col_rev, col_strict = st.columns([3, 2, 1])
col_id.text_input("Model id (Hub id, local folder, or embedded)", key="model_id")
col_rev.text_input("Revision (branch, tag or commit; optional)", key="revision")
col_strict.toggle("Strict policy", key="strict", help="Block on medium findings and above.")
current = ModelKey.from_inputs(state.model_id, state.revision, state.strict)

if st.button("Validate", key="validate", type="primary") or state.validate_on_load:
    state.validate_on_load = False
    with st.spinner(f"Validating {current.ref}: hashing every file and running every rule..."):
        state.validation = validate_model(current)
    state.image = None

validation = state.validation
if validation is not None:
    line = verdict_line(validation)
    if validation.key != current:
        line += " (for earlier settings: validate again)"
    {"allowed": st.success, "blocked": st.error}.get(validation.verdict, st.warning)(line)
    if validation.report is not None:
        blocking = blocking_rows(validation)
        if blocking:
            st.subheader("Blocking findings")
            st.table(blocking)
        rows = finding_rows(validation.report)
        st.subheader(f"Findings ({len(rows)})")
        if rows:
            st.table(rows)
        else:
            st.write("No findings.")
        st.subheader("Files checked (sha256)")
        st.table(file_rows(validation.report))

# -- 2. generation ------------------------------------------------------------------------------------
st.header("2. Generate")
allowed, why_not = generation_gate(validation, current)
prompt = st.text_area("Prompt", value="a photo of an astronaut riding a horse on mars", key="prompt")
negative = st.text_input("Negative prompt", value="", key="negative_prompt")
c1, c2, c3, c4 = st.columns(4)
steps = c1.number_input("Steps", min_value=1, max_value=1000, value=25, step=1, key="steps")
seed = c2.number_input("Seed", min_value=0, max_value=2**32 - 1, value=0, step=1, key="seed")
guidance = c3.number_input("Guidance scale", min_value=0.0, max_value=50.0, value=7.5, step=0.5, key="guidance")
scheduler = c4.selectbox("Scheduler", SCHEDULERS, key="scheduler")
c5, c6, _, _ = st.columns(4)
height = c5.number_input("Height", min_value=8, max_value=2048, step=8, key="height")
width = c6.number_input("Width", min_value=8, max_value=2048, step=8, key="width")

if not allowed:
    st.info(why_not)
if st.button("Generate", key="generate", disabled=not allowed, type="primary"):
    params = GenerationParams(prompt=prompt, negative_prompt=negative, num_steps=int(steps), seed=int(seed),
                              guidance_scale=float(guidance), height=int(height), width=int(width),
                              scheduler=scheduler)
    bar = st.progress(0.0, text="Preparing the pipeline (the first run compiles the graphs)...")
    try:
        params.check()
        # One compiled pipeline is kept per verified model and shape; a new validation gets a new one.
        shape = (params.height, params.width, params.scheduler, params.backend)
        cached = state.pipeline
        if cached is None or cached[0] is not validation.model or cached[1] != shape:
            state.pipeline = cached = (validation.model, shape, build_pipeline(validation.model, params))

        def on_step(done: int, total: int) -> None:
            bar.progress(min(done / max(total, 1), 1.0), text=f"Denoising: step {done} of {total}")

        state.image = generate(validation.model, params, pipeline=cached[2], progress=on_step)
        bar.progress(1.0, text="Done.")
    except UserError as exc:
        bar.empty()
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug: one line in the page, not a traceback
        bar.empty()
        st.error(f"internal error: {type(exc).__name__}: {exc}")

if state.image is not None:
    st.image(state.image.png, caption=state.image.provenance.get("sdsecure:prompt", ""))
    st.download_button("Download PNG (with provenance)", data=state.image.png, file_name=state.image.file_name,
                       mime="image/png", key="download")
    st.table([{"key": k, "value": v} for k, v in state.image.provenance.items()])
