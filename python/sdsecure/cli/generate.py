"""Text-to-image command line: gate -> SD 1.5 pipeline on MAX -> PNG with provenance.

    python python/text_to_image_secure.py --prompt "a photo of an astronaut riding a horse on mars"
    sdsecure-generate --prompt "..." --model-id org/name --revision <sha> --output out/astronaut.png

Order of work: every argument is checked first (cheap), then the gate validates the model (hashing and
scanning every file), then the three graphs are compiled (cached), then the image is made and written
atomically. A bad argument therefore costs nothing and writes nothing.

Exit codes: 0 image written; 1 the gate blocked the model; 2 bad input, or the run could not complete;
130 interrupted.

`main_unverified` is the original, unvalidated behaviour (python/text_to_image.py): the files are
hashed but no rule runs, a banner says so, and the PNG is stamped "unverified".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence, TextIO

from sdsecure import __version__
from sdsecure.cli.common import ArgumentParser, run, setup_logging, show_progress
from sdsecure.errors import SecurityError, UserError

DEFAULT_MODEL = "embedded"
DEFAULT_SIZE = 512            # SD 1.5's native resolution
EMBEDDED_SIZE = 128           # the embedded tiny model's default (its images are noise at any size)
SCHEDULER_CHOICES = ("pndm", "ddim", "euler")
BACKENDS = ("max", "onnxruntime")
MAX_FINDINGS_SHOWN = 10

EMBEDDED_NOTE = ("note: the default model 'embedded' is a tiny random-weight SD 1.5-shaped pipeline shipped for "
                 "offline demos and tests: its image looks like noise. For real images use a real SD 1.5 ONNX "
                 "model: --model-id org/name --revision <commit sha> (see --list-safe-models).")

SKIP_BANNER = """\
!!! WARNING: --skip-validation: the security gate's rules are OFF for this run.
!!! The model's files are hashed (the hashes go into the PNG) but NOT scanned: a malicious or
!!! backdoored graph would run. The image is stamped "unverified"."""

UNVERIFIED_BANNER = """\
==============================================================================================
 WARNING: text_to_image.py runs models WITHOUT the sdsecure security gate.
 Files are hashed but not scanned: a malicious or backdoored ONNX graph would run unchecked.
 Use python/text_to_image_secure.py instead (same flags, every model validated first).
=============================================================================================="""


def _prog(secure: bool) -> str:
    """The name the user typed: the console script (sdsecure-generate) or the entry script."""
    name = os.path.basename(sys.argv[0] or "")
    if name.startswith("sdsecure-"):
        return name
    return "text_to_image_secure.py" if secure else "text_to_image.py"


def build_parser(*, secure: bool = True) -> ArgumentParser:
    p = ArgumentParser(prog=_prog(secure), description=(
        "Generate an image with Stable Diffusion 1.5 on MAX" +
        (", after the security gate has validated the model." if secure else
         " WITHOUT validating the model (kept for comparison; use text_to_image_secure.py).")))
    p.add_argument("--prompt", help="what to draw (required)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    p.add_argument("--num-steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0; numpy's RNG, so "
                   "seeds do not reproduce diffusers/torch images)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None,
                   help="override the model's scheduler (default: its scheduler_config.json)")
    p.add_argument("--height", type=int, default=None,
                   help=f"image height, a multiple of 64 (default {DEFAULT_SIZE}; {EMBEDDED_SIZE} for the embedded model)")
    p.add_argument("--width", type=int, default=None,
                   help=f"image width, a multiple of 64 (default {DEFAULT_SIZE}; {EMBEDDED_SIZE} for the embedded model)")
    p.add_argument("--output", default="output.png", help="PNG to write (default output.png)")
    p.add_argument("--model-id", default=DEFAULT_MODEL,
                   help="'embedded' (default), a local folder, or a Hub id org/name[@revision]")
    p.add_argument("--revision", default=None, help="Hub revision to pin (a 40-hex commit sha is best)")
    p.add_argument("--lockfile", default=None, metavar="PATH",
                   help="also verify this lockfile (made by `model_security.py lock`): a hash or revision "
                        "mismatch blocks the run")
    p.add_argument("--backend", choices=BACKENDS, default="max", help="inference engine (default max)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress details (-vv: debug)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    if secure:
        p.add_argument("--strict-security", action="store_true",
                       help="strict policy: block on medium findings and above (default: critical only)")
        p.add_argument("--skip-validation", action="store_true",
                       help="DANGEROUS: hash the files but run no security rule; the PNG says 'unverified'")
        p.add_argument("--list-safe-models", action="store_true",
                       help="list known SD 1.5 models and what is known about each, then exit")
    return p


# -- checks before any slow work -----------------------------------------------------------------

def check_args(args: argparse.Namespace, *, secure: bool = True) -> Path:
    """Every user input, checked before the gate or a compile: raises a one-line UserError."""
    from sdsecure.pipeline.image import check_output_path
    from sdsecure.pipeline.schedulers import check_override
    from sdsecure.pipeline.sd15 import check_generate_args, check_size
    from sdsecure.refs import parse_ref

    if args.prompt is None:
        raise UserError("--prompt is required")
    check_generate_args(args.prompt, args.negative_prompt, args.num_steps, args.guidance_scale, args.seed)
    if secure and args.skip_validation and args.strict_security:
        raise UserError("--skip-validation and --strict-security contradict each other: choose one")
    default = EMBEDDED_SIZE if args.model_id == DEFAULT_MODEL else DEFAULT_SIZE
    args.height = default if args.height is None else args.height
    args.width = default if args.width is None else args.width
    check_size(args.height, args.width)
    check_override(args.scheduler)
    output = check_output_path(args.output)
    parse_ref(args.model_id, args.revision)   # a malformed or missing model reference fails here
    return output


# -- output helpers --------------------------------------------------------------------------------

def _counts_text(counts: dict[str, int]) -> str:
    order = ("critical", "high", "medium", "low", "info")
    return ", ".join(f"{counts.get(k, 0)} {k}" for k in order)


def verdict_line(model: Any) -> str:
    report = model.report
    if not model.verified:
        rev = f" @ {model.revision}" if model.revision else ""
        return (f"gate: SKIPPED for {model.ref}{rev} (unvalidated run): {len(model.files)} files hashed, "
                "no security rule run")
    lock = (report.lockfile or {}).get("status", "absent")
    rev = f" @ {model.revision}" if model.revision else ""
    return (f"gate: {report.verdict.upper()} {model.ref}{rev} under the {report.policy} policy: "
            f"{_counts_text(report.counts())}; {len(model.files)} files hashed; lockfile {lock}")


def blocked_summary(report: Any) -> list[str]:
    blocking = report.blocking_findings()
    lines = [f"gate: BLOCKED under the {report.policy} policy: {len(blocking)} blocking finding(s) "
             f"({_counts_text(report.counts())} in all). Nothing was compiled or run."]
    for f in blocking[:MAX_FINDINGS_SHOWN]:
        where = f" at {f.where}" if f.where else ""
        lines.append(f"  [{f.severity}] {f.rule} in {f.file or '(model)'}{where}: {f.message}")
    if len(blocking) > MAX_FINDINGS_SHOWN:
        lines.append(f"  ... and {len(blocking) - MAX_FINDINGS_SHOWN} more")
    lines.append(f"  full report: python python/model_security.py --model-id {report.model_ref}"
                 + (f" --revision {report.revision}" if report.revision else ""))
    return lines


def _engine_version(backend: str) -> str:
    dist = "max" if backend == "max" else "onnxruntime"
    try:
        return f"{'MAX' if backend == 'max' else 'onnxruntime'} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return backend


def provenance(model: Any, args: argparse.Namespace, pipe: Any, entry: str) -> dict[str, str]:
    prov = dict(model.provenance())
    if model.verified:
        prov["sdsecure:findings"] = _counts_text(model.report.counts())
    prov.update({
        "sdsecure:entry": entry,
        "sdsecure:prompt": args.prompt,
        "sdsecure:negative_prompt": args.negative_prompt,
        "sdsecure:seed": str(args.seed),
        "sdsecure:steps": str(args.num_steps),
        "sdsecure:guidance_scale": str(args.guidance_scale),
        "sdsecure:size": f"{args.width}x{args.height}",
        "sdsecure:scheduler": pipe.scheduler_name,
        "sdsecure:backend": args.backend,
        "sdsecure:engine": _engine_version(args.backend),
        "sdsecure:device": pipe.device,
        "sdsecure:version": __version__,
        "Software": f"sdsecure {__version__}",
    })
    return prov


# -- the run ---------------------------------------------------------------------------------------

def _generate(args: argparse.Namespace, output: Path, model: Any, say: TextIO, entry: str) -> dict[str, Any]:
    from sdsecure.pipeline.image import save_png
    from sdsecure.pipeline.sd15 import StableDiffusion15, check_components

    check_components(model)           # a missing component: one line, before any compile
    if args.model_id == DEFAULT_MODEL:
        print(EMBEDDED_NOTE, file=say)
    t0 = time.perf_counter()
    print(f"loading the pipeline on {args.backend} ({args.width}x{args.height})"
          + ("; the first run at a size compiles the graphs (minutes), later runs reuse the cache..."
             if args.backend == "max" else "..."), file=say)
    pipe = StableDiffusion15(model, backend=args.backend, height=args.height, width=args.width,
                             scheduler=args.scheduler, num_steps=args.num_steps)
    t1 = time.perf_counter()
    image = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, num_steps=args.num_steps,
                          guidance_scale=args.guidance_scale, seed=args.seed)
    t2 = time.perf_counter()
    prov = provenance(model, args, pipe, entry)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_png(output, image, prov)
    print(f"image: {output} ({args.width}x{args.height}, {args.num_steps} steps, {pipe.scheduler_name}, "
          f"{args.backend} on {pipe.device}; load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s)", file=say)
    return {"status": "ok", "image": str(output), "provenance": prov,
            "seconds": {"load": round(t1 - t0, 3), "generate": round(t2 - t1, 3)}}


def _summary(model: Any) -> dict[str, Any]:
    report = model.report
    return {"model": model.ref, "revision": model.revision, "verified": model.verified,
            "verdict": report.verdict if model.verified else "unverified",
            "policy": report.policy if model.verified else "skipped",
            "counts": report.counts(), "lockfile_sha256": model.lockfile_sha256}


def _emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _main(argv: Sequence[str] | None, *, secure: bool = True) -> int:
    try:
        args = build_parser(secure=secure).parse_args(argv)
    except SystemExit as e:   # --help, or a bad flag (already printed as one line): a code, not an exit
        return e.code if isinstance(e.code, int) else 0
    if args.verbose:
        setup_logging(args.verbose)
    else:
        show_progress()
    if secure and args.list_safe_models:
        from sdsecure import models_catalog

        if args.json:
            _emit_json({"models": models_catalog.as_json()})
        else:
            print(models_catalog.render_text(), end="")
        return 0
    try:
        output = check_args(args, secure=secure)
    except UserError as e:
        if args.json:
            _emit_json({"status": "error", "error": str(e)})
        raise

    from sdsecure import gate

    say = sys.stderr if args.json else sys.stdout
    entry = "text_to_image_secure" if secure else "text_to_image"
    skip = (not secure) or args.skip_validation
    if not secure:
        print(UNVERIFIED_BANNER, file=sys.stderr)
    elif skip:
        print(SKIP_BANNER, file=sys.stderr)
    try:
        if skip:
            model = gate.load_unverified(args.model_id, revision=args.revision, lockfile=args.lockfile)
        else:
            policy = "strict" if args.strict_security else "default"
            model = gate.validate(args.model_id, policy, revision=args.revision, lockfile=args.lockfile)
    except SecurityError as e:
        lines = blocked_summary(e.report)
        print("\n".join(lines), file=sys.stderr)
        if args.json:
            _emit_json({"status": "blocked", "model": e.report.model_ref, "revision": e.report.revision,
                        "policy": e.report.policy, "counts": e.report.counts(),
                        "blocking": [f.to_dict() for f in e.report.blocking_findings()]})
        return SecurityError.exit_code
    print(verdict_line(model), file=say)
    try:
        result = _generate(args, output, model, say, entry)
    except UserError as e:
        if args.json:
            _emit_json({"status": "error", "error": str(e), **_summary(model)})
        raise
    if args.json:
        _emit_json({**result, **_summary(model)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """text_to_image_secure.py / sdsecure-generate."""
    return run(lambda a: _main(a, secure=True), argv, prog=_prog(True))


def main_unverified(argv: Sequence[str] | None = None) -> int:
    """text_to_image.py: the original behaviour, no security rules (hashing only), with a warning banner."""
    return run(lambda a: _main(a, secure=False), argv, prog=_prog(False))


if __name__ == "__main__":
    sys.exit(main())
