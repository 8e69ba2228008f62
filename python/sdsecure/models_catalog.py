"""What is known about SD 1.5 models one might run here (`text_to_image_secure.py --list-safe-models`).

Honest by design: only the embedded model has been checked by this project. Everything about Hub repos
below is what their public Hub pages showed (file lists, commit ids, the Hub's own scanner labels); none
of it was downloaded or verified by us offline. Whatever you pick, the gate checks it on every run: pin
the revision (`--revision <40-hex sha>`) once you have audited it, and keep its lockfile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class CatalogEntry:
    model_id: str
    revision: str | None          # a full commit sha or branch we know of; None if we know none
    format: str                   # layout and precision
    status: str                   # short label
    facts: list[str] = field(default_factory=list)    # what is known, with where it comes from
    needs: list[str] = field(default_factory=list)    # flags or work it needs here
    verified_by_us: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CATALOG: list[CatalogEntry] = [
    CatalogEntry(
        model_id="embedded",
        revision=None,
        format="SD 1.5-shaped ONNX pipeline (legacy exporter, opset 14, fp32), shipped inside the package",
        status="verified by this project (lockfile sdsecure.lock.json, checked on every run)",
        facts=["tiny random-weight model made by tools/export_tiny_sd.py: the flow works end to end, "
               "but every image it makes is noise"],
        needs=["nothing: it is the default (--model-id embedded)"],
        verified_by_us=True,
    ),
    CatalogEntry(
        model_id="runwayml/stable-diffusion-v1-5",
        revision="onnx",
        format="diffusers ONNX layout (OnnxStableDiffusionPipeline), fp32, unet/weights.pb external data",
        status="historical: the repository was removed from the Hub in 2024",
        facts=["the 'onnx' branch, commit eb82621657dd232b010cbecf9675d176ff82b712 ('ONNX weights', HF staff), "
               "was the reference SD 1.5 ONNX export; this project's layout copies it",
               "not verified by us offline; pull requests or mirrors that claim to be it must be checked "
               "file by file (sha256) against a copy you trust"],
        needs=["a mirror you trust, passed as a local folder or org/name with --revision <sha>"],
    ),
    CatalogEntry(
        model_id="onnx-community/stable-diffusion-v1-5-ONNX",
        revision=None,
        format="diffusers ONNX layout (text_encoder, unet/model.onnx + weights.pb 3.44 GB, vae_decoder, "
               "vae_encoder, safety_checker), fp32",
        status="Hub scanner showed its files as 'Safe'; not verified by us offline",
        facts=["latest commit seen on the Hub page: 90ff1f1 ('Upload 13 files'); full sha not known here"],
        needs=["--model-id onnx-community/stable-diffusion-v1-5-ONNX --revision <the full sha you audited>",
               "the safety_checker and vae_encoder folders are not used by this pipeline (text-to-image only)"],
    ),
    CatalogEntry(
        model_id="modularai/stable-diffusion-1.5-onnx",
        revision="e3232dd5842cd2210b32ecab16c2ceb0bd793545",
        format="diffusers ONNX layout, fp32 (the model of the original MAX example)",
        status="FLAGGED: the Hub's scanner marks text_encoder/model.onnx as suspicious (PAIT-ONNX-200, "
               "architectural backdoor detection); the reason this project exists",
        facts=["the flag is a heuristic: run `model_security.py --model-id modularai/stable-diffusion-1.5-onnx` "
               "to see what our gate reports and which nodes to inspect in Netron",
               "not verified by us offline"],
        needs=["do not use with --skip-validation; the default gate policy decides"],
    ),
    CatalogEntry(
        model_id="jackos/stable-diffusion-1.5-onnx",
        revision=None,
        format="diffusers ONNX layout, fp32, unet external data named model.onnx_data",
        status="Hub page showed one file scanned as suspicious; not verified by us offline",
        facts=["uploaded by the same Hub user (jackos) who committed modularai/stable-diffusion-1.5-onnx; "
               "how the two relate was not checked"],
        needs=["treat as modularai/stable-diffusion-1.5-onnx: audit first"],
    ),
    CatalogEntry(
        model_id="nmkd/stable-diffusion-1.5-onnx-fp16",
        revision=None,
        format="ONNX, fp16 weights",
        status="not verified by us offline",
        facts=["fp16 graphs: inputs are cast to the graph's declared dtypes, but our engine's fp16 support is "
               "untested; expect differences from fp32 references"],
        needs=["--backend onnxruntime if the MAX importer refuses an fp16 op"],
    ),
    CatalogEntry(
        model_id="axodoxian/stable_diffusion_onnx",
        revision=None,
        format="ONNX optimised by Microsoft Olive (fused com.microsoft operators)",
        status="not runnable here as is; not verified by us offline",
        facts=["Olive's fused contrib operators (com.microsoft domain) are outside the standard ONNX opset "
               "our importer supports; the gate also reports non-standard domains"],
        needs=["a plain (unoptimised) ONNX export instead"],
    ),
    CatalogEntry(
        model_id="TensorStack/stable-diffusion-v1-5-onnx",
        revision=None,
        format="ONNX, with a tokenizer/model.onnx (onnxruntime-extensions custom ops) and controlnet",
        status="Hub page showed one file scanned as suspicious; not verified by us offline",
        facts=["its ONNX tokenizer needs onnxruntime-extensions custom operators; this pipeline uses "
               "vocab.json + merges.txt only"],
        needs=["audit first; only the text_encoder / unet / vae_decoder folders would be used"],
    ),
    CatalogEntry(
        model_id="Comfy-Org/stable-diffusion-v1-5-archive",
        revision=None,
        format="single-file safetensors checkpoint (v1-5-pruned-emaonly.safetensors), not ONNX",
        status="archival re-upload of RunwayML's weights (its model card says hash-identical); not ONNX",
        facts=["safetensors holds no code, but this pipeline runs ONNX graphs only"],
        needs=["export to ONNX first (diffusers' convert_stable_diffusion_checkpoint_to_onnx.py or "
               "`optimum-cli export onnx`), then run the exported folder through the gate as a local path"],
    ),
]


def render_text() -> str:
    lines = ["SD 1.5 models for this pipeline: what is known (only 'embedded' is verified by sdsecure;",
             "the rest is what the Hub pages showed, not verified by us offline). The gate checks any model",
             "on every run; pin a revision you audited with --revision <sha>.", ""]
    for e in CATALOG:
        rev = f" @ {e.revision}" if e.revision else ""
        lines.append(f"{e.model_id}{rev}")
        lines.append(f"    status : {e.status}")
        lines.append(f"    format : {e.format}")
        for fact in e.facts:
            lines.append(f"    known  : {fact}")
        for need in e.needs:
            lines.append(f"    needs  : {need}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def as_json() -> list[dict[str, Any]]:
    return [e.to_dict() for e in CATALOG]
