# Stable Diffusion 1.5 text-to-image, the Mojo entry point.
#
# Mojo parses and validates the command line itself; the model goes through the SAME Python
# security gate as every other entry point (`sdsecure.gate.validate`, through Python interop),
# and only a model the gate allowed reaches the pipeline. There is no lighter check here.
#
#   mojo run mojo/text_to_image.mojo --prompt "a lighthouse at dusk" --output out.png
#
# Under `mojo run` it checks its arguments, then builds itself once into the sdsecure cache and
# runs that binary (MAX's Python engine cannot share the JIT's runtime; see "hand-over" below).
# `mojo build mojo/text_to_image.mojo -o text_to_image` gives the same program directly.
# (Mojo 1.x only accepts the `.mojo` extension; the old `.🔥` one is refused.)
#
# Run it from the project's Python environment (`. .venv/bin/activate`, or `pixi run`), or point
# Mojo at that interpreter with MOJO_PYTHON=/path/to/venv/bin/python.
#
# Exit codes, as the Python CLI: 0 image written, 1 model blocked by the gate, 2 bad input or the
# run could not complete, 130 interrupted.

from std.python import Python, PythonObject
from std.sys import argv, exit, stderr

comptime EXIT_BLOCKED = 1
comptime EXIT_ERROR = 2
comptime EXIT_INTERRUPTED = 130

comptime MAX_STEPS = 1000
comptime MAX_SIDE = 2048
comptime MAX_GUIDANCE = 100.0
comptime AUTO_SIDE = -1            # not given: the Python CLI's default for the model

comptime USAGE = """usage: mojo run mojo/text_to_image.mojo --prompt TEXT [options]

Validate a Stable Diffusion 1.5 ONNX model with the sdsecure gate, then generate an image on MAX.

options:
  --prompt TEXT            what to draw (required, non-empty)
  --negative-prompt TEXT   what to steer away from (default: "")
  --num-steps N            denoising steps, 1..1000 (default: 25)
  --seed N                 random seed, >= 0; 0 is a seed (default: 0)
  --guidance-scale X       classifier-free guidance scale, 0..100 (default: 7.5)
  --height N, --width N    image size in pixels, multiples of 64 up to 2048
                           (default: 512; 128 for the tiny embedded model)
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
        height=AUTO_SIDE,
        width=AUTO_SIDE,
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


def parse_side(flag: String, text: String) raises -> Int:
    var value = parse_int(flag, text)
    check_side(flag, value)
    return value


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
        opts.height = parse_side(flag, value)
    elif flag == "--width":
        opts.width = parse_side(flag, value)
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
    if not (g >= 0.0 and g <= MAX_GUIDANCE):  # also rejects NaN and infinities
        raise Error("--guidance-scale must be a number in 0..100, got " + String(g))
    if opts.scheduler != "" and opts.scheduler != "pndm" and opts.scheduler != "ddim" and opts.scheduler != "euler":
        raise Error("--scheduler must be pndm, ddim or euler, got '" + opts.scheduler + "'")
    if opts.backend != "max" and opts.backend != "onnxruntime":
        raise Error("--backend must be max or onnxruntime, got '" + opts.backend + "'")
    if opts.output.strip() == "":
        raise Error("--output must not be empty")
    if opts.model_id == "":
        raise Error("--model-id must not be empty")


def check_side(flag: String, value: Int) raises:
    # 64, not just 8: SD 1.5's UNet halves the latent (side / 8) three times (as sdsecure.pipeline.sd15).
    if value <= 0 or value % 64 != 0 or value > MAX_SIDE:
        raise Error(
            flag + " must be a positive multiple of 64 up to " + String(MAX_SIDE) + ", got " + String(value)
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


def handle_python_error(exc: PythonObject, stage: String) raises:
    """Maps an exception from the Python side to the CLI's exit codes (never a traceback).
    A blocked model prints the same summary as the Python CLI: verdict, then each blocking
    finding as [severity] RULE in FILE at NODE: message."""
    var builtins = Python.import_module("builtins")
    var errors = Python.import_module("sdsecure.errors")
    if Bool(builtins.isinstance(exc, errors.SecurityError)):
        var cli = Python.import_module("sdsecure.cli.generate")
        for line in cli.blocked_summary(exc.report):
            print(String(py=line), file=stderr)
        exit(EXIT_BLOCKED)
    if Bool(builtins.isinstance(exc, errors.UserError)):
        fail(String(py=Python.str(exc)), EXIT_ERROR)
    if Bool(builtins.isinstance(exc, builtins.KeyboardInterrupt)):
        print("interrupted", file=stderr)
        exit(EXIT_INTERRUPTED)
    var one_line = String(" ").join(String(py=Python.str(exc)).split())
    fail("internal error during " + stage + ": " + String(py=builtins.type(exc).__name__) + ": " + one_line,
         EXIT_ERROR)


def import_or_explain(name: String) raises -> PythonObject:
    try:
        return Python.import_module(name)
    except e:
        var sys = Python.import_module("sys")
        fail(
            "cannot import the Python package '" + name + "' with " + String(py=sys.executable)
            + " (" + String(e) + "). Activate the project's environment (. .venv/bin/activate, "
            + "or pixi run) or set MOJO_PYTHON to its python.",
            EXIT_ERROR,
        )
        raise e^


def run(opts: Options) raises:
    var bridge = Python.evaluate(BRIDGE, file=True, name="_sdsecure_mojo_bridge")
    var gate = import_or_explain("sdsecure.gate")
    var cli = import_or_explain("sdsecure.cli.generate")
    var image_mod = import_or_explain("sdsecure.pipeline.image")
    var none = Python.none()

    # Sizes default like the Python CLI's: 128 for the tiny embedded model, 512 otherwise.
    var default_side = Int(py=cli.EMBEDDED_SIZE) if opts.model_id == "embedded" else Int(py=cli.DEFAULT_SIZE)
    var height = opts.height if opts.height > 0 else default_side
    var width = opts.width if opts.width > 0 else default_side

    # Fail on an unwritable --output now, not after minutes of work (same check as the Python CLI).
    var res = bridge.call(image_mod.check_output_path, opts.output)
    if not (res[1] is none):
        handle_python_error(res[1], "checking --output")
    var output = res[0]

    # 1. The gate: the same validate() every entry point calls. Blocked -> SecurityError -> exit 1.
    var policy = "strict" if opts.strict else "default"
    var revision: PythonObject = none
    if opts.revision != "":
        revision = PythonObject(opts.revision)
    res = bridge.call(gate.validate, opts.model_id, policy, revision=revision)
    if not (res[1] is none):
        handle_python_error(res[1], "validation")
    var model = res[0]
    print(String(py=cli.verdict_line(model)))

    # 2. The pipeline, only on the verified model.
    if opts.model_id == "embedded":
        print(String(py=cli.EMBEDDED_NOTE))
    var sd15 = import_or_explain("sdsecure.pipeline.sd15")
    var scheduler: PythonObject = none
    if opts.scheduler != "":
        scheduler = PythonObject(opts.scheduler)
    print("pipeline: " + String(width) + "x" + String(height) + ", " + String(opts.num_steps)
          + " steps, seed " + String(opts.seed) + ", guidance " + String(opts.guidance_scale)
          + ", backend " + opts.backend + " (the first run at a size compiles the graphs)")
    res = bridge.call(sd15.StableDiffusion15, model, backend=opts.backend, height=height, width=width,
                      scheduler=scheduler)
    if not (res[1] is none):
        handle_python_error(res[1], "pipeline setup")
    var pipe = res[0]
    res = bridge.call(pipe.generate, opts.prompt, negative_prompt=opts.negative_prompt,
                      num_steps=opts.num_steps, guidance_scale=opts.guidance_scale, seed=opts.seed)
    if not (res[1] is none):
        handle_python_error(res[1], "generation")
    var image = res[0]

    # 3. The PNG, with the same provenance the Python CLI writes, entry "mojo".
    var argparse = Python.import_module("argparse")
    var run_args = argparse.Namespace(
        prompt=opts.prompt, negative_prompt=opts.negative_prompt, seed=opts.seed, num_steps=opts.num_steps,
        guidance_scale=opts.guidance_scale, width=width, height=height, backend=opts.backend,
    )
    res = bridge.call(cli.provenance, model, run_args, pipe, "mojo")
    if not (res[1] is none):
        handle_python_error(res[1], "provenance")
    var provenance = res[0]
    output.parent.mkdir(parents=True, exist_ok=True)
    res = bridge.call(image_mod.save_png, output, image, provenance)
    if not (res[1] is none):
        handle_python_error(res[1], "writing the PNG")
    print("image: " + String(py=Python.str(output)))


# ---------------------------------------------------------------------------------------------
# `mojo run` hand-over
# ---------------------------------------------------------------------------------------------
# Under `mojo run` the program lives in the Mojo JIT, which already owns the Modular runtime
# context; MAX's Python engine then asks for a context with other options and the process aborts
# ("Init::getOrCreateContext() requested an M::Context with different Init::Options", MAX 26.7 /
# Mojo 1.2). A program built with `mojo build` has no such conflict. So, when it finds itself
# JIT-hosted, this program builds itself once into the sdsecure cache (keyed by the sha256 of this
# source and the Mojo version) and runs that binary with the same arguments. Arguments are still
# checked here first, so a bad flag costs no build.


def jit_hosted(arg0: String) -> Bool:
    """`mojo run x.mojo` passes the source path as argv[0]; a built binary gets its own path."""
    return arg0.endswith(".mojo")


def mojo_version() raises -> String:
    try:
        return String(py=Python.import_module("importlib.metadata").version("mojo"))
    except:
        return "unknown"


def built_binary(source: String) raises -> PythonObject:
    """The cached `mojo build` of `source`, built now if missing (atomically: build, then rename)."""
    var hashlib = Python.import_module("hashlib")
    var os = Python.import_module("os")
    var shutil = Python.import_module("shutil")
    var subprocess = Python.import_module("subprocess")
    var sys = Python.import_module("sys")
    var pathlib = Python.import_module("pathlib")
    var hub = import_or_explain("sdsecure.hub")
    var digest = String(py=hashlib.sha256(pathlib.Path(source).read_bytes()).hexdigest())
    var folder = hub.sdsecure_cache_dir() / "mojo"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    var exe = folder / ("text_to_image-" + String(digest[byte=:16]) + "-mojo" + mojo_version())
    if Bool(exe.is_file()):
        return exe
    var mojo = shutil.which("mojo")
    if mojo is Python.none():
        mojo = pathlib.Path(sys.executable).with_name("mojo")
    print("mojo: building " + source + " once into " + String(py=Python.str(exe))
          + " (MAX's engine cannot run inside `mojo run`'s JIT; later runs reuse the binary)", file=stderr)
    var tmp = String(py=Python.str(exe)) + ".tmp-" + String(py=Python.str(os.getpid()))
    var res = subprocess.run([mojo, "build", source, "-o", tmp], capture_output=True, text=True)
    if Int(py=res.returncode) != 0:
        fail("mojo build " + source + " failed: " + String(py=res.stderr), EXIT_ERROR)
    os.replace(tmp, exe)
    return exe


def hand_over(source: String, args: List[String]) raises:
    """Runs the built binary with our arguments, with the same Python, and exits with its status."""
    var os = Python.import_module("os")
    var subprocess = Python.import_module("subprocess")
    var sys = Python.import_module("sys")
    var exe: PythonObject
    try:
        exe = built_binary(source)
    except e:
        fail("cannot build " + source + " into the sdsecure cache (set SDSECURE_CACHE to a writable folder, "
             + "or run `mojo build` yourself): " + String(" ").join(String(e).split()), EXIT_ERROR)
        raise e^
    var cmd = Python.list(exe)
    for i in range(len(args)):
        cmd.append(args[i])
    var env = os.environ.copy()
    env["MOJO_PYTHON"] = sys.executable
    exit(Int(py=subprocess.run(cmd, env=env).returncode))


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
        fail(String(e), EXIT_ERROR)
        return
    # Anything not mapped above (an I/O error, a bug) is still one line and exit 2, never the
    # runtime's "Unhandled exception" with exit 1, which would read as "blocked".
    try:
        if jit_hosted(String(raw[0])):
            hand_over(String(raw[0]), args)
        run(opts)
    except e:
        fail("internal error: " + String(" ").join(String(e).split()), EXIT_ERROR)
