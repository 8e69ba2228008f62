# Stable Diffusion 1.5 text-to-image, the Mojo entry point.
#
# Mojo parses and validates the command line itself; the model goes through the SAME Python
# security gate as every other entry point (`sdsecure.gate.validate`, through Python interop),
# and only a model the gate allowed reaches the pipeline. There is no lighter check here.
#
#   mojo run mojo/text_to_image.mojo --prompt "a lighthouse at dusk" --output out.png
#
# Run it from the project's Python environment (`. .venv/bin/activate`, or `pixi run`), or point
# Mojo at that interpreter with MOJO_PYTHON=/path/to/venv/bin/python.
#
# Exit codes, as the Python CLI: 0 image written, 1 model blocked by the gate, 2 bad input or the
# model could not be checked, 3 unexpected internal error.

from std.python import Python, PythonObject
from std.sys import argv, exit, stderr

comptime EXIT_BLOCKED = 1
comptime EXIT_USAGE = 2
comptime EXIT_INTERNAL = 3

comptime MAX_STEPS = 1000
comptime MAX_SIDE = 2048

comptime USAGE = """usage: mojo run mojo/text_to_image.mojo --prompt TEXT [options]

Validate a Stable Diffusion 1.5 ONNX model with the sdsecure gate, then generate an image on MAX.

options:
  --prompt TEXT            what to draw (required, non-empty)
  --negative-prompt TEXT   what to steer away from (default: "")
  --num-steps N            denoising steps, 1..1000 (default: 25)
  --seed N                 random seed, >= 0; 0 is a seed (default: 0)
  --guidance-scale X       classifier-free guidance scale, >= 0 (default: 7.5)
  --height N, --width N    image size in pixels, positive multiples of 8 (default: 512)
  --scheduler NAME         pndm, ddim or euler (default: the model's scheduler_config.json)
  --backend NAME           max or onnxruntime (default: max)
  --output PATH            PNG to write (default: output.png)
  --model-id REF           Hub id, local folder or "embedded" (default: embedded)
  --revision REV           Hub branch, tag or commit to pin (default: the ref's own)
  --strict-security        block on medium findings and above (default policy blocks critical)
  -h, --help               show this help and exit

Every model passes the sdsecure gate before anything is compiled; a blocked model exits with
status 1 and the blocking findings."""


@fieldwise_init
struct Options(Copyable, Movable):
    var prompt: String
    var negative_prompt: String
    var num_steps: Int
    var seed: Int
    var guidance_scale: Float64
    var height: Int
    var width: Int
    var scheduler: String          # "" = the model's own scheduler config
    var backend: String
    var output: String
    var model_id: String
    var revision: String           # "" = none given
    var strict: Bool
    var help: Bool


def default_options() -> Options:
    return Options(
        prompt="",
        negative_prompt="",
        num_steps=25,
        seed=0,
        guidance_scale=7.5,
        height=512,
        width=512,
        scheduler="",
        backend="max",
        output="output.png",
        model_id="embedded",
        revision="",
        strict=False,
        help=False,
    )


# ---------------------------------------------------------------------------------------------
# Argument parsing and validation (pure Mojo). Errors raise with a one-line message.
# ---------------------------------------------------------------------------------------------

def parse_int(flag: String, text: String) raises -> Int:
    try:
        return atol(text.strip())
    except:
        raise Error(flag + " expects an integer, got '" + text + "'")


def parse_float(flag: String, text: String) raises -> Float64:
    try:
        return atof(text.strip())
    except:
        raise Error(flag + " expects a number, got '" + text + "'")


def is_value_flag(flag: String) -> Bool:
    return (
        flag == "--prompt"
        or flag == "--negative-prompt"
        or flag == "--num-steps"
        or flag == "--seed"
        or flag == "--guidance-scale"
        or flag == "--height"
        or flag == "--width"
        or flag == "--scheduler"
        or flag == "--backend"
        or flag == "--output"
        or flag == "--model-id"
        or flag == "--revision"
    )


def apply_flag(mut opts: Options, flag: String, value: String) raises:
    if flag == "--prompt":
        opts.prompt = value
    elif flag == "--negative-prompt":
        opts.negative_prompt = value
    elif flag == "--num-steps":
        opts.num_steps = parse_int(flag, value)
    elif flag == "--seed":
        opts.seed = parse_int(flag, value)
    elif flag == "--guidance-scale":
        opts.guidance_scale = parse_float(flag, value)
    elif flag == "--height":
        opts.height = parse_int(flag, value)
    elif flag == "--width":
        opts.width = parse_int(flag, value)
    elif flag == "--scheduler":
        opts.scheduler = String(value.strip()).lower()
    elif flag == "--backend":
        opts.backend = String(value.strip()).lower()
    elif flag == "--output":
        opts.output = value
    elif flag == "--model-id":
        opts.model_id = String(value.strip())
    elif flag == "--revision":
        opts.revision = String(value.strip())


def parse_args(args: List[String]) raises -> Options:
    """Parses `args` (without the program name): `--flag value` and `--flag=value` forms."""
    var opts = default_options()
    var i = 0
    while i < len(args):
        var arg = args[i]
        i += 1
        if arg == "-h" or arg == "--help":
            opts.help = True
            continue
        if arg == "--strict-security":
            opts.strict = True
            continue
        var flag = arg
        var value = String("")
        var has_value = False
        var eq = arg.find("=")
        if arg.startswith("--") and eq > 2:
            flag = String(arg[byte=:eq])
            value = String(arg[byte = eq + 1 :])
            has_value = True
        if not is_value_flag(flag):
            if flag == "--strict-security":
                raise Error("--strict-security takes no value")
            if flag.startswith("-"):
                raise Error("unknown option " + flag + " (see --help)")
            raise Error("unexpected argument '" + arg + "' (options start with --; see --help)")
        if not has_value:
            if i >= len(args) or is_value_flag(args[i]) or args[i] == "--strict-security":
                raise Error(flag + " expects a value")
            value = args[i]
            i += 1
        apply_flag(opts, flag, value)
    return opts^


def check_options(opts: Options) raises:
    """Mojo-side validation: everything that can be judged before touching Python or a model."""
    if opts.prompt.strip() == "":
        raise Error("--prompt is required and must not be empty")
    if opts.num_steps <= 0 or opts.num_steps > MAX_STEPS:
        raise Error("--num-steps must be between 1 and " + String(MAX_STEPS) + ", got " + String(opts.num_steps))
    if opts.seed < 0:
        raise Error("--seed must be >= 0, got " + String(opts.seed))
    var g = opts.guidance_scale
    if not (g >= 0.0 and g - g == 0.0):  # rejects negatives, NaN and infinities
        raise Error("--guidance-scale must be a finite number >= 0, got " + String(g))
    check_side("--height", opts.height)
    check_side("--width", opts.width)
    if opts.scheduler != "" and opts.scheduler != "pndm" and opts.scheduler != "ddim" and opts.scheduler != "euler":
        raise Error("--scheduler must be pndm, ddim or euler, got '" + opts.scheduler + "'")
    if opts.backend != "max" and opts.backend != "onnxruntime":
        raise Error("--backend must be max or onnxruntime, got '" + opts.backend + "'")
    if opts.output.strip() == "":
        raise Error("--output must not be empty")
    if opts.model_id == "":
        raise Error("--model-id must not be empty")


def check_side(flag: String, value: Int) raises:
    if value <= 0 or value % 8 != 0 or value > MAX_SIDE:
        raise Error(
            flag + " must be a positive multiple of 8 up to " + String(MAX_SIDE) + ", got " + String(value)
        )


# ---------------------------------------------------------------------------------------------
# Python side: the shared gate and pipeline, through interop
# ---------------------------------------------------------------------------------------------

# Calling a Python function from Mojo turns any Python exception into a plain Mojo Error (a
# message). To tell a SecurityError (exit 1) from a UserError (exit 2) we need the exception
# object itself, so calls go through this two-line shim: (result, None) or (None, exception).
comptime BRIDGE = """
def call(fn, *args, **kwargs):
    try:
        return (fn(*args, **kwargs), None)
    except Exception as exc:
        return (None, exc)
"""


def fail(message: String, code: Int):
    print("error: " + message, file=stderr)
    exit(code)


def severity_name(finding: PythonObject) raises -> String:
    return String(py=Python.str(finding.severity))


def print_finding(finding: PythonObject) raises:
    var file = String(py=finding.file)
    if file == "":
        file = "(model)"
    var where = String(py=finding.where)
    if where == "":
        where = "(whole file)"
    print("  [" + severity_name(finding) + "] " + String(py=finding.rule) + "  file=" + file + "  node=" + where)
    print("      " + String(py=finding.message))


def print_verdict(report: PythonObject) raises:
    var counts = report.counts()
    var summary = String("")
    for name in ["critical", "high", "medium", "low", "info"]:
        if summary != "":
            summary += ", "
        summary += String(py=Python.str(counts[name])) + " " + name
    var revision = String("local")
    if not (report.revision is Python.none()):
        revision = String(py=report.revision)
    print("gate: model " + String(py=report.model_ref) + " @ " + revision + "  policy=" + String(py=report.policy))
    print("gate: " + String(len(report.files)) + " files hashed; findings: " + summary)
    print("gate: verdict " + String(py=report.verdict).upper())


def audit_command(report: PythonObject) raises -> String:
    """The audit CLI command that prints this report in full (text, JSON or SARIF)."""
    var cmd = "python python/model_security.py --model-id " + String(py=report.model_ref)
    if not (report.revision is Python.none()):
        cmd += " --revision " + String(py=report.revision)
    if String(py=report.policy) == "strict":
        cmd += " --strict"
    return cmd


def handle_python_error(exc: PythonObject, stage: String) raises:
    """Maps an exception from the Python side to the CLI's exit codes (never a traceback)."""
    var builtins = Python.import_module("builtins")
    var errors = Python.import_module("sdsecure.errors")
    if Bool(builtins.isinstance(exc, errors.SecurityError)):
        var report = exc.report
        print_verdict(report)
        var blocking = report.blocking_findings()
        print("gate: refusing to run " + String(py=report.model_ref) + ": "
              + String(len(blocking)) + " blocking finding(s):")
        for finding in blocking:
            print_finding(finding)
        print("gate: nothing was compiled or generated. Full report: " + audit_command(report))
        exit(EXIT_BLOCKED)
    if Bool(builtins.isinstance(exc, errors.UserError)):
        fail(String(py=Python.str(exc)), EXIT_USAGE)
    if Bool(builtins.isinstance(exc, builtins.KeyboardInterrupt)):
        fail("interrupted", 130)
    fail(stage + " failed: " + String(py=builtins.type(exc).__name__) + ": " + String(py=Python.str(exc)), EXIT_INTERNAL)


def import_or_explain(name: String) raises -> PythonObject:
    try:
        return Python.import_module(name)
    except e:
        var sys = Python.import_module("sys")
        fail(
            "cannot import the Python package '" + name + "' with " + String(py=sys.executable)
            + " (" + String(e) + "). Activate the project's environment (. .venv/bin/activate, "
            + "or pixi run) or set MOJO_PYTHON to its python.",
            EXIT_USAGE,
        )
        raise e^


def run(opts: Options) raises:
    var bridge = Python.evaluate(BRIDGE, file=True, name="_sdsecure_mojo_bridge")
    var gate = import_or_explain("sdsecure.gate")
    var none = Python.none()

    # Fail on an unwritable --output now, not after minutes of work (same check as the Python CLI).
    var image_mod = import_or_explain("sdsecure.pipeline.image")
    var res = bridge.call(image_mod.check_output_path, opts.output)
    if not (res[1] is none):
        handle_python_error(res[1], "checking --output")

    # 1. The gate: the same validate() every entry point calls. Blocked -> SecurityError.
    var policy = "strict" if opts.strict else "default"
    var revision: PythonObject = none
    if opts.revision != "":
        revision = PythonObject(opts.revision)
    print("gate: validating " + opts.model_id + " (policy " + policy + ") ...")
    res = bridge.call(gate.validate, opts.model_id, policy, revision=revision)
    if not (res[1] is none):
        handle_python_error(res[1], "validation")
    var model = res[0]
    print_verdict(model.report)
    var shown = 0
    for finding in model.report.findings:
        if shown == 0:
            print("gate: findings below the blocking threshold (see the audit CLI for details):")
        print_finding(finding)
        shown += 1

    # 2. The pipeline, only on the verified model.
    var sd15 = import_or_explain("sdsecure.pipeline.sd15")
    var scheduler: PythonObject = none
    if opts.scheduler != "":
        scheduler = PythonObject(opts.scheduler)
    print("pipeline: " + String(opts.width) + "x" + String(opts.height) + ", " + String(opts.num_steps)
          + " steps, seed " + String(opts.seed) + ", guidance " + String(opts.guidance_scale)
          + ", backend " + opts.backend)
    res = bridge.call(sd15.StableDiffusion15, model, backend=opts.backend, height=opts.height,
                      width=opts.width, scheduler=scheduler)
    if not (res[1] is none):
        handle_python_error(res[1], "pipeline setup")
    var pipe = res[0]
    res = bridge.call(pipe.generate, opts.prompt, negative_prompt=opts.negative_prompt,
                      num_steps=opts.num_steps, guidance_scale=opts.guidance_scale, seed=opts.seed)
    if not (res[1] is none):
        handle_python_error(res[1], "generation")
    var image = res[0]

    # 3. The PNG, with the gate's provenance plus what this run did.
    var provenance = model.provenance()
    provenance["sdsecure:entry"] = "mojo"
    provenance["sdsecure:prompt"] = opts.prompt
    provenance["sdsecure:negative_prompt"] = opts.negative_prompt
    provenance["sdsecure:seed"] = String(opts.seed)
    provenance["sdsecure:steps"] = String(opts.num_steps)
    provenance["sdsecure:guidance_scale"] = String(opts.guidance_scale)
    provenance["sdsecure:size"] = String(opts.width) + "x" + String(opts.height)
    provenance["sdsecure:scheduler"] = opts.scheduler if opts.scheduler != "" else "model default"
    provenance["sdsecure:backend"] = opts.backend
    res = bridge.call(image_mod.save_png, opts.output, image, provenance)
    if not (res[1] is none):
        handle_python_error(res[1], "writing the PNG")
    print("image: " + opts.output)


def main() raises:
    var raw = argv()
    var args = List[String]()
    for i in range(1, len(raw)):
        args.append(String(raw[i]))
    var opts: Options
    try:
        opts = parse_args(args)
        if opts.help:
            print(USAGE)
            return
        check_options(opts)
    except e:
        fail(String(e), EXIT_USAGE)
        return
    run(opts)
