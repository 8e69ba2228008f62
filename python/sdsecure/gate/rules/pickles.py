"""Pickle rules: find pickles anywhere in a repo, by content, and judge every global they import.

Library choice: Python's own opcode table and argument readers (`pickletools`, stdlib), driven by a
small *symbolic* unpickler written here. Nothing is ever unpickled.

Why not a scanner from PyPI? They were read before deciding:
- picklescan (and modelscan, which embeds the same approach) is deny-list first: a global that is on
  neither list is only "suspicious", and the operands of STACK_GLOBAL are recovered by looking
  backwards for the last two string opcodes. That heuristic has been bypassed repeatedly (memo
  confusion with PUT vs MEMOIZE, out-of-order memo, GET of a missing key crashing the scan:
  mmaitre314/picklescan#14, #22, #52; protectai/modelscan#85).
- fickling decompiles the whole pickle into a Python AST (a 2,300-line interpreter) to find calls;
  far more than we need, a large dependency inside the trust path, and its own parser may differ
  from CPython's.
What we need is small and exact: replay the stack and memo the way `_pickle` does, so STACK_GLOBAL
operands are known exactly (or known to be computed at load time, which is itself an attack), and
compare each imported global with an *allow-list* (torch's own `weights_only` list, plus numpy and
collections reconstruction functions). GLOBAL/INST lines are decoded as `_pickle` decodes them
(UTF-8, no escape processing), not as `pickletools` would.

Where pickles are looked for: every file, judged by content. Zip archives (torch's format: a
`*/data.pkl` beside raw storages, or `.npz`) are opened and their members judged the same way,
nested zips included (depth-capped); `.npy` arrays with an object dtype carry a pickle after their
header; legacy torch files are several pickles back to back. A stream that starts with a protocol
header (or sits in a *.pkl/*.pickle file) and does not parse is reported as malformed, with every
global it imported before breaking; any other file is reported only when it really parses as a
pickle, or when a loader would have called a global before the stream broke.
"""

from __future__ import annotations

import io
import pickletools
import posixpath
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass, field
from typing import Any, Iterator

from sdsecure.gate.blob import Blob
from sdsecure.gate.report import Finding, Severity
from sdsecure.gate.rules import ScanContext, declare, file_rule

# --- rule ids ------------------------------------------------------------------------------------

DANGEROUS = declare(
    "PICKLE-DANGEROUS-GLOBAL", Severity.CRITICAL,
    "Pickle imports a global that can run commands, code or I/O",
    "Unpickling imports and may call any global a pickle names. Globals such as os.system, "
    "builtins.eval/exec, subprocess.*, runpy, importlib or a nested torch.load/pickle.loads give "
    "whoever wrote the file code execution on the machine that loads it (torch.load without "
    "weights_only, pickle.load, joblib.load, ...).",
    "Do not load this file with pickle-based loaders. Obtain the weights as ONNX or safetensors "
    "from a trusted publisher; if you must inspect it, do so in a disposable sandbox.")
UNKNOWN = declare(
    "PICKLE-UNKNOWN-GLOBAL", Severity.CRITICAL,
    "Pickle imports a global outside the tensor-reconstruction allow-list",
    "Model weights only need torch/numpy/collections reconstruction functions (the same list "
    "torch.load(weights_only=True) accepts). Any other global is imported (running its module's "
    "import-time code) and possibly called while unpickling; it may be a code-execution gadget that "
    "no deny-list knows yet.",
    "Check what the named global does. Prefer safetensors or ONNX; load pickles only with "
    "torch.load(weights_only=True) and never from an untrusted source.")
UNRESOLVED = declare(
    "PICKLE-UNRESOLVED-GLOBAL", Severity.CRITICAL,
    "Pickle computes the name of the global it imports at load time",
    "STACK_GLOBAL takes its module and name from the stack. A normal pickler pushes two constant "
    "strings; a pickle whose operands come from a function call result (or an extension-registry "
    "code) hides which global it imports from every static scanner: a known evasion technique.",
    "Treat the file as malicious. Do not load it.")
RULE_SEVERITY = {DANGEROUS.id: DANGEROUS.severity, UNKNOWN.id: UNKNOWN.severity}
MUTATION = declare(
    "PICKLE-GLOBAL-MUTATION", Severity.CRITICAL,
    "Pickle modifies an imported module-level object",
    "BUILD/SETITEM/APPEND applied directly to an imported global (instead of to a freshly built "
    "object) sets attributes on a module-level function or class. It is used to smuggle attacker "
    "strings past scanners (e.g. numpy.prod.a = 'os') and to patch library code before it runs.",
    "Treat the file as malicious. Do not load it.")
MALFORMED = declare(
    "PICKLE-MALFORMED", Severity.HIGH,
    "Pickle or archive that cannot be fully analysed",
    "A truncated or garbled pickle still executes every opcode before the point where it breaks; an "
    "archive that Python's zipfile cannot read may still be read by torch's own zip reader. Either "
    "way the scanner cannot vouch for what the loader would run.",
    "Re-download the file from its source and compare hashes; prefer safetensors or ONNX.")
TORCHSCRIPT = declare(
    "PICKLE-TORCHSCRIPT", Severity.MEDIUM,
    "Archive contains TorchScript code",
    "A TorchScript archive carries program code (code/*.py) that torch.jit.load compiles and runs; "
    "it is attacker-controlled logic, not just weights.",
    "Review the code files or use a weights-only format (safetensors, ONNX).")
PRESENT = declare(
    "PICKLE-FILE", Severity.INFO,
    "Pickle data found; every global is on the allow-list",
    "Recorded for the audit trail: the SD pipeline never unpickles anything, but other tools that "
    "open this repo might.",
    "Nothing to do. Prefer safetensors for new uploads.")

# --- what is allowed, what is known to be dangerous ----------------------------------------------

_TORCH_TYPES = ["BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double", "Float",
                "Half", "Int", "Long", "Short"]
_DTYPES = ["bfloat16", "bool", "complex128", "complex32", "complex64", "float16", "float32", "float64",
           "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
           "float4_e2m1fn_x2", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "qint8", "qint32", "quint8", "quint4x2", "quint2x4", "bits8", "bits16", "bits1x8", "bits2x4",
           "bits4x2", "per_channel_affine", "per_channel_affine_float_qparams", "per_channel_symmetric",
           "per_tensor_affine", "per_tensor_symmetric"] + [f"int{i}" for i in range(1, 8)] + [
           f"uint{i}" for i in range(1, 8)]

#: (module, name) pairs a weights file may import: torch's `weights_only` allow-list (torch 2.x),
#: numpy's array/scalar/dtype reconstruction and a few builtin containers.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [("collections", "OrderedDict"), ("collections", "Counter"), ("_codecs", "encode"),
     ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
     ("builtins", "slice"),
     ("torch", "Size"), ("torch", "Tensor"), ("torch", "device"),
     ("torch.nn.parameter", "Parameter"), ("torch.serialization", "_get_layout"),
     ("torch.storage", "TypedStorage"), ("torch.storage", "UntypedStorage"),
     ("torch._tensor", "_rebuild_from_type_v2")]
    + [("torch", d) for d in _DTYPES]
    + [(m, f"{t}Storage") for m in ("torch", "torch.cuda") for t in _TORCH_TYPES]
    + [(m, f"{t}Tensor") for m in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse")
       for t in _TORCH_TYPES]
    + [("torch", f"{q}Storage") for q in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")]
    + [("torch._utils", f"_rebuild_{f}") for f in (
        "tensor", "tensor_v2", "tensor_v3", "parameter", "parameter_with_state", "qtensor",
        "sparse_tensor", "nested_tensor", "device_tensor_from_numpy", "device_tensor_from_cpu_tensor",
        "meta_tensor_no_storage", "wrapper_subclass")]
    + [(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")]
    + [(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")]   # protocol 5
    + [("numpy", "ndarray"), ("numpy", "dtype")]
)

#: Modules (and their submodules) whose globals give code execution, process, file or network access,
#: or another deserializer. Any global from them is critical.
DANGEROUS_MODULES: frozenset[str] = frozenset("""
    os posix nt posixpath ntpath subprocess _posixsubprocess sys socket _socket shutil runpy pty pdb bdb
    code codeop ctypes _ctypes cffi importlib imp zipimport pkgutil multiprocessing _multiprocessing
    asyncio threading _thread signal resource gc inspect webbrowser urllib urllib2 http httplib ftplib
    smtplib telnetlib requests httpx aiohttp ssl pickle _pickle cPickle dill cloudpickle marshal shelve
    joblib types timeit cProfile profile trace pydoc doctest idlelib lib2to3 ensurepip pip venv distutils
    setuptools site io _io tempfile logging platform uuid _osx_support _aix_support _pyrepl functools
    operator _operator builtins __builtin__ tkinter sqlite3 yaml numpy.f2py numpy.testing numpy.distutils
    numpy.ctypeslib torch.hub torch.jit torch._inductor torch._dynamo torch.fx torch.package
    torch.utils.cpp_extension torch.utils.collect_env torch.utils.bottleneck torch.utils._config_module
    torch.utils.data torch.serialization torch.multiprocessing torch.distributed torch.ops torch._C
    torch._ops
""".split())

#: Harmless builtins (constructors of plain values); every other builtins.* global is critical.
_SAFE_BUILTINS = frozenset("set frozenset bytearray complex slice bytes str int float bool list dict "
                           "tuple range object".split())

#: Function names that are dangerous whatever module exports them (deserializers, exec, shells).
DANGEROUS_NAMES: frozenset[str] = frozenset("""
    system popen popen2 popen3 popen4 spawn spawnl spawnv spawnve spawnlp execl execv execve execvp
    exec eval execfile compile __import__ import_module load loads load_inline _load_from_bytes
    getattr setattr delattr run_path run_module check_output check_call call Popen open_code
""".split())

_IDENT = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*$")


def classify(module: str, name: str) -> Severity | None:
    """None when (module, name) is allowed; CRITICAL when known dangerous; HIGH otherwise."""
    if (module, name) in ALLOWED:
        return None
    parts = name.split(".")
    if any(p.startswith("__") and p.endswith("__") for p in parts):
        return Severity.CRITICAL      # attribute traversal: x.__globals__, __builtins__, __code__ ...
    if module in ("builtins", "__builtin__"):
        return Severity.HIGH if parts[0] in _SAFE_BUILTINS and len(parts) == 1 else Severity.CRITICAL
    mod_parts = module.split(".")
    if any(".".join(mod_parts[:i]) in DANGEROUS_MODULES for i in range(1, len(mod_parts) + 1)):
        return Severity.CRITICAL
    if parts[-1] in DANGEROUS_NAMES:
        return Severity.CRITICAL
    return Severity.HIGH


# --- byte access ---------------------------------------------------------------------------------

#: Names that announce a pickle. Torch files (.bin/.pt/.pth/.ckpt) need no entry: they are zips or
#: start with a protocol header. Raw weights are often called *.bin, so the extension alone proves
#: nothing; what matters is the content.
PICKLE_EXTENSIONS = frozenset({".pkl", ".pickle"})
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
MAX_ZIP_DEPTH = 3
MAX_MEMBER_BYTES = 512 << 20       # a pickle member larger than this is not scanned (reported)
MAX_MEMBERS = 200_000
SNIFF_MEMBER_BYTES = 64 << 20      # unlabelled zip members larger than this are only judged by magic
SNIFF_MAX_OPS = 2_000_000          # for files that are not labelled as pickles
MAX_OPS = 5_000_000                # a torch data.pkl has ~30 opcodes per tensor
MAX_DEPTH = 100_000                # MARK nesting / stack items / memo entries: memory caps for the
MAX_ITEMS = 1_000_000              # symbolic replay (the real unpickler would use as much or more)
SNIFF_LINE_LIMIT = 1 << 16


class _Reader:
    """A file-like view (read/readline/tell) of bytes or an mmap, without copying the whole thing."""

    def __init__(self, data: Any, start: int = 0, line_limit: int = 1 << 30):
        self.data, self.pos, self.end, self.line_limit = data, start, len(data), line_limit

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.end - self.pos
        if n > self.end - self.pos:     # a short read makes the arg reader fail: no huge copy
            self.pos = self.end
            return b""
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def readline(self) -> bytes:
        stop = min(self.end, self.pos + self.line_limit)
        i = self.data.find(b"\n", self.pos, stop)
        stop = i + 1 if i >= 0 else stop
        out = bytes(self.data[self.pos:stop])
        self.pos = stop
        return out

    def tell(self) -> int:
        return self.pos


class _MemFile(io.RawIOBase):
    """A seekable read-only file over bytes/mmap for zipfile (no copy of large blobs)."""

    def __init__(self, data: Any):
        self._mv, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._mv)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._mv) - self._pos))
        b[:n] = self._mv[self._pos:self._pos + n]
        self._pos += n
        return n


# --- the symbolic unpickler ----------------------------------------------------------------------

class _Malformed(Exception):
    def __init__(self, message: str, pos: int):
        super().__init__(message)
        self.pos = pos


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Call:            # the result of calling something at load time: its value is unknown
    callee: Any


@dataclass(frozen=True)
class _Tuple:
    items: tuple


class _Obj:             # any other value (list, dict, persistent id, buffer, ...)
    pass


_OBJ = _Obj()


@dataclass
class _Hit:
    rule: str
    severity: Severity
    pos: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamResult:
    end: int                                   # offset after STOP (or where parsing stopped)
    complete: bool                             # reached STOP without error
    ops: int = 0
    globals: dict[str, int] = field(default_factory=dict)   # "module.name" -> first offset
    hits: list[_Hit] = field(default_factory=list)
    error: str | None = None
    error_pos: int | None = None


def _iter_ops(r: _Reader, max_ops: int) -> Iterator[tuple[str, Any, int]]:
    for _ in range(max_ops):
        pos = r.pos
        code = r.read(1)
        if not code:
            raise _Malformed("pickle ends before its STOP opcode (truncated)", pos)
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise _Malformed(f"unknown opcode {code!r}", pos)
        if op.name in ("GLOBAL", "INST"):         # as _pickle reads them: two UTF-8 lines, no escapes
            lines = [r.readline(), r.readline()]
            if not all(ln.endswith(b"\n") for ln in lines):
                raise _Malformed(f"{op.name} argument without newline", pos)
            try:
                arg: Any = tuple(ln[:-1].decode("utf-8") for ln in lines)
            except UnicodeDecodeError:
                raise _Malformed(f"{op.name} argument is not UTF-8", pos) from None
        elif op.arg is None:
            arg = None
        else:
            try:
                arg = op.arg.reader(r)
            except Exception as exc:  # noqa: BLE001 - any reader failure means a broken stream
                raise _Malformed(f"bad {op.name} argument: {exc}", pos) from None
        yield op.name, arg, pos
        if op.name == "STOP":
            return
    raise _Malformed(f"more than {max_ops} opcodes: not analysed further", r.pos)


_CONST_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
              "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
              "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}


def _short(v: Any) -> Any:
    if isinstance(v, str):
        return v if len(v) <= 200 else v[:200] + "..."
    if isinstance(v, bytes):
        return repr(v[:200])
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    if isinstance(v, _Global):
        return f"<global {v.module}.{v.name}>"
    if isinstance(v, _Tuple):
        return [_short(x) for x in v.items[:8]]
    return "<object>"


class _Machine:
    """Replays a pickle's stack, mark stack and memo exactly as `_pickle` would, but with symbolic
    values: constants stay constants, imports become _Global, calls become _Call (value unknown)."""

    def __init__(self, res: StreamResult):
        self.res = res
        self.stack: list[Any] = []
        self.meta: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.seen: dict[tuple[str, str], _Hit] = {}

    # stack helpers, failing as the real unpickler fails
    def pop(self, pos: int) -> Any:
        if not self.stack:
            raise _Malformed("stack underflow", pos)
        return self.stack.pop()

    def top(self, pos: int) -> Any:
        if not self.stack:
            raise _Malformed("stack underflow", pos)
        return self.stack[-1]

    def pop_mark(self, pos: int) -> list[Any]:
        if not self.meta:
            raise _Malformed("no MARK on the stack", pos)
        items, self.stack = self.stack, self.meta.pop()
        return items

    def hit(self, rule: str, sev: Severity, pos: int, msg: str, **ev: Any) -> _Hit:
        h = _Hit(rule, sev, pos, msg, ev)
        self.res.hits.append(h)
        return h

    def import_global(self, module: str, name: str, pos: int, op: str) -> _Global:
        if self.proto < 3:                       # what _pickle does with fix_imports=True
            if (module, name) in NAME_MAPPING:
                module, name = NAME_MAPPING[(module, name)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
        g = _Global(module, name)
        key = f"{module}.{name}"
        self.res.globals.setdefault(key, pos)
        sev = classify(module, name)
        if sev is not None:
            prev = self.seen.get((module, name))
            if prev is not None:
                prev.evidence["occurrences"] += 1
            else:
                rule = DANGEROUS.id if sev is Severity.CRITICAL else UNKNOWN.id
                what = "dangerous" if sev is Severity.CRITICAL else "non-allow-listed"
                # Outside the allow-list blocks under the default policy, whatever the name.
                self.seen[(module, name)] = self.hit(
                    rule, RULE_SEVERITY[rule], pos, f"pickle imports {what} global {key} ({op} at byte {pos})",
                    **{"global": key, "opcode": op, "offset": pos, "occurrences": 1, "called": False})
        return g

    def call(self, callee: Any, args: Any, pos: int, op: str) -> _Call:
        if isinstance(callee, _Global):
            h = self.seen.get((callee.module, callee.name))
            if h is not None and not h.evidence["called"]:
                h.evidence["called"] = True
                h.evidence["call_opcode"] = op
                h.evidence["call_offset"] = pos
                if isinstance(args, _Tuple):
                    h.evidence["call_args"] = [_short(a) for a in args.items[:8]]
                kind = "dangerous" if h.severity is Severity.CRITICAL else "non-allow-listed"
                h.message = (f"pickle imports and calls {kind} global {h.evidence['global']} "
                             f"({op} at byte {pos})")
        return _Call(callee)

    def mutate(self, target: Any, pos: int, op: str, detail: Any = None) -> None:
        if isinstance(target, _Global):
            self.hit(MUTATION.id, Severity.CRITICAL, pos,
                     f"{op} at byte {pos} modifies imported global {target.module}.{target.name}",
                     **{"global": f"{target.module}.{target.name}", "opcode": op, "offset": pos,
                        "state": _short(detail)})

    def step(self, name: str, arg: Any, pos: int) -> None:  # noqa: C901 - one branch per opcode family
        if len(self.stack) > MAX_ITEMS or len(self.memo) > MAX_ITEMS:
            raise _Malformed(f"more than {MAX_ITEMS} stack or memo entries: not analysed further", pos)
        push = self.stack.append
        if name in _CONST_OPS:
            push(arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            push({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name == "PROTO":
            if arg > 5:
                raise _Malformed(f"unsupported pickle protocol {arg}", pos)
            self.proto = arg
        elif name == "FRAME" or name == "READONLY_BUFFER":
            pass
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "NEXT_BUFFER", "BYTEARRAY8"):
            push(_OBJ)
        elif name == "EMPTY_TUPLE":
            push(_Tuple(()))
        elif name == "MARK":
            if len(self.meta) >= MAX_DEPTH:
                raise _Malformed(f"MARK nesting deeper than {MAX_DEPTH}: not analysed further", pos)
            self.meta.append(self.stack)
            self.stack = []
        elif name == "TUPLE":
            push_items = self.pop_mark(pos)
            self.stack.append(_Tuple(tuple(push_items)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self.pop(pos) for _ in range(n)][::-1]
            push(_Tuple(tuple(items)))
        elif name in ("LIST", "DICT", "FROZENSET"):
            self.pop_mark(pos)
            self.stack.append(_OBJ)
        elif name in ("APPEND", "SETITEM"):
            value = self.pop(pos)
            if name == "SETITEM":
                self.pop(pos)
            self.mutate(self.top(pos), pos, name, value)
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            items = self.pop_mark(pos)
            self.mutate(self.top(pos), pos, name, _Tuple(tuple(items)))
        elif name == "POP":
            if self.stack:
                self.stack.pop()
            else:
                self.pop_mark(pos)
        elif name == "POP_MARK":
            self.pop_mark(pos)
        elif name == "DUP":
            push(self.top(pos))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if arg < 0:
                raise _Malformed("negative PUT index", pos)
            self.memo[int(arg)] = self.top(pos)
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top(pos)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in self.memo:
                raise _Malformed(f"memo key {int(arg)} was never stored", pos)
            push(self.memo[int(arg)])
        elif name == "GLOBAL":
            push(self.import_global(arg[0], arg[1], pos, name))
        elif name == "STACK_GLOBAL":
            gname, gmod = self.pop(pos), self.pop(pos)
            if isinstance(gname, str) and isinstance(gmod, str):
                push(self.import_global(gmod, gname, pos, name))
            elif isinstance(gname, (_Call, _Obj)) or isinstance(gmod, (_Call, _Obj)):
                self.hit(UNRESOLVED.id, Severity.CRITICAL, pos,
                         f"STACK_GLOBAL at byte {pos} imports a global whose name is computed at load time",
                         opcode=name, offset=pos, module=_short(gmod), name=_short(gname))
                push(_Call(None))
            else:
                raise _Malformed("STACK_GLOBAL operands are not strings", pos)
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.hit(UNRESOLVED.id, Severity.HIGH, pos,
                     f"{name} at byte {pos} imports a global through the copyreg extension registry "
                     f"(code {arg}); which one depends on the loading process", opcode=name, offset=pos,
                     code=arg)
            push(_Call(None))
        elif name == "INST":
            g = self.import_global(arg[0], arg[1], pos, name)
            push_args = self.pop_mark(pos)
            self.stack.append(self.call(g, _Tuple(tuple(push_args)), pos, name))
        elif name == "OBJ":
            items = self.pop_mark(pos)
            if not items:
                raise _Malformed("OBJ without a class", pos)
            self.stack.append(self.call(items[0], _Tuple(tuple(items[1:])), pos, name))
        elif name in ("REDUCE", "NEWOBJ"):          # callable/class, then its argument tuple
            args = self.pop(pos)
            push(self.call(self.pop(pos), args, pos, name))
        elif name == "NEWOBJ_EX":
            self.pop(pos)
            args = self.pop(pos)
            push(self.call(self.pop(pos), args, pos, name))
        elif name == "BUILD":
            state = self.pop(pos)
            self.mutate(self.top(pos), pos, name, state)
        elif name == "PERSID":
            push(_OBJ)
        elif name == "BINPERSID":
            self.pop(pos)
            push(_OBJ)
        elif name == "STOP":
            self.pop(pos)
        else:  # pragma: no cover - pickletools knows no other opcode
            raise _Malformed(f"unhandled opcode {name}", pos)


def scan_stream(data: Any, start: int = 0, *, sniff: bool = False) -> StreamResult:
    """Symbolically execute one pickle stream starting at `start` in `data` (bytes or mmap)."""
    r = _Reader(data, start, SNIFF_LINE_LIMIT if sniff else 1 << 30)
    res = StreamResult(end=start, complete=False)
    m = _Machine(res)
    try:
        for name, arg, pos in _iter_ops(r, SNIFF_MAX_OPS if sniff else MAX_OPS):
            res.ops += 1
            m.step(name, arg, pos)
        res.complete = True
    except _Malformed as exc:
        res.error, res.error_pos = str(exc), exc.pos
    res.end = r.pos
    return res


# --- file / archive level ------------------------------------------------------------------------

def _looks_like_pickle_start(data: Any) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and data[1] <= 5


def _plausible_global(key: str) -> bool:
    return bool(_IDENT.match(key))


def _scan_pickle_bytes(data: Any, labelled: bool) -> list[_Hit]:
    """All pickles at the start of `data` (legacy torch files hold several back to back)."""
    hits: list[_Hit] = []
    sniff = not labelled and not _looks_like_pickle_start(data)
    first = scan_stream(data, 0, sniff=sniff)
    if not first.complete and sniff:
        # Not announced as a pickle and not parseable to its end: report only what a loader would
        # really have executed before failing (a call of a plausible global), not noise in binary data.
        real = [h for h in first.hits if h.rule in (UNRESOLVED.id, MUTATION.id)
                or (h.evidence.get("called") and _plausible_global(str(h.evidence.get("global", ""))))]
        if not real or first.ops < 3:
            return []
        first.hits = real
    streams = [first]
    while first.complete and streams[-1].complete and streams[-1].end < len(data) and len(streams) < 64:
        nxt = scan_stream(data, streams[-1].end, sniff=True)
        if not nxt.complete:
            break                       # raw tensor data after the pickles (legacy torch format)
        streams.append(nxt)
    for s in streams:
        hits.extend(s.hits)             # the member (if any) is in the finding's `where`
    if not first.complete:
        hits.append(_Hit(MALFORMED.id, Severity.HIGH, first.error_pos or 0,
                         f"pickle cannot be parsed past byte {first.error_pos}: {first.error}",
                         {"offset": first.error_pos, "error": first.error, "opcodes_read": first.ops}))
    globs = sorted({g for s in streams for g in s.globals})
    if not any(h.severity > Severity.INFO for h in hits) and (globs or not sniff):
        # (a few bytes of raw data can parse as a global-free pickle by chance: not worth a line)
        hits.append(_Hit(PRESENT.id, Severity.INFO, 0,
                         f"pickle data ({len(streams)} stream(s)); all {len(globs)} globals allow-listed",
                         {"globals": globs[:50], "streams": len(streams)}))
    return hits


def _scan_npy(data: Any, label: str) -> list[_Hit]:
    """A .npy file is a header (a Python dict literal) then raw data, or a pickle for object arrays."""
    if len(data) < 10:
        return [_Hit(MALFORMED.id, Severity.HIGH, 0, f"{label}: truncated .npy header", {})]
    major = data[6]
    hlen_size = 2 if major == 1 else 4
    hlen = int.from_bytes(bytes(data[8:8 + hlen_size]), "little")
    header = bytes(data[8 + hlen_size: 8 + hlen_size + hlen])
    if b"'O'" in header or b'"O"' in header or b"|O" in header:
        hits = _scan_pickle_bytes(bytes(data[8 + hlen_size + hlen:]), True)
        for h in hits:
            h.message = f"object array: {h.message}"
        return hits
    return []


def _scan_zip(data: Any, label: str, depth: int) -> list[_Hit]:
    try:
        zf = zipfile.ZipFile(_MemFile(data))
        infos = zf.infolist()
    except Exception as exc:  # noqa: BLE001 - any zip error is a finding
        return [_Hit(MALFORMED.id, Severity.HIGH, 0,
                     f"{label or 'file'}: zip archive cannot be read by Python's zipfile: {exc}",
                     {"error": str(exc)})]
    hits: list[_Hit] = []
    if len(infos) > MAX_MEMBERS:
        return [_Hit(MALFORMED.id, Severity.HIGH, 0, f"{label or 'zip'}: {len(infos)} members, over the cap",
                     {"members": len(infos)})]
    names = [i.filename for i in infos]
    code = [n for n in names if "/code/" in f"/{n}" and n.endswith(".py")]
    if code and any(n.endswith("constants.pkl") or n.endswith("data.pkl") for n in names):
        hits.append(_Hit(TORCHSCRIPT.id, Severity.MEDIUM, 0,
                         f"{label + ': ' if label else ''}TorchScript archive with {len(code)} code file(s)",
                         {"code_files": code[:20]}))
    for info in infos:
        member = f"{label}/{info.filename}" if label else info.filename
        if info.is_dir():
            continue
        base = posixpath.basename(info.filename)
        labelled = posixpath.splitext(base)[1].lower() in PICKLE_EXTENSIONS
        try:
            with zf.open(info) as fh:
                head = fh.read(8)
                magic = head.startswith(ZIP_MAGIC) or head.startswith(NPY_MAGIC) or _looks_like_pickle_start(head)
                sniff = (info.file_size <= SNIFF_MEMBER_BYTES and head[:1]
                         and head[:1].decode("latin-1") in pickletools.code2op)
                if not (labelled or magic or sniff):
                    continue            # raw tensor storage or other data: not a pickle
                if info.file_size > MAX_MEMBER_BYTES:
                    hits.append(_Hit(MALFORMED.id, Severity.HIGH, 0,
                                     f"{member}: {info.file_size} bytes, too large to analyse",
                                     {"member": member, "size": info.file_size}))
                    continue
                body = head + fh.read(MAX_MEMBER_BYTES + 1 - len(head))
        except Exception as exc:  # noqa: BLE001 - encrypted, bad CRC, name mismatch, bad compression
            hits.append(_Hit(MALFORMED.id, Severity.HIGH, 0, f"{member}: member cannot be read: {exc}",
                             {"member": member, "error": str(exc)}))
            continue
        for h in _scan_buffer(body, member, labelled, depth + 1):
            h.evidence.setdefault("member", member)
            hits.append(h)
    return hits


def _scan_buffer(data: Any, label: str, labelled: bool, depth: int = 0) -> list[_Hit]:
    head = bytes(data[:8])
    if head.startswith(ZIP_MAGIC):
        if depth > MAX_ZIP_DEPTH:
            return [_Hit(MALFORMED.id, Severity.HIGH, 0, f"{label}: zip nested deeper than {MAX_ZIP_DEPTH}", {})]
        return _scan_zip(data, label, depth)
    if head.startswith(NPY_MAGIC):
        return _scan_npy(data, label or "array")
    if not head or head[:1].decode("latin-1") not in pickletools.code2op:
        return []
    return _scan_pickle_bytes(data, labelled)


def scan_file(path: str, data: Any) -> list[Finding]:
    """Findings for one file of the repo (any name): pickles, torch zips, npy/npz."""
    labelled = posixpath.splitext(path)[1].lower() in PICKLE_EXTENSIONS
    out = []
    for h in _scan_buffer(data, "", labelled):
        member = h.evidence.get("member")
        where = f"{member} @ byte {h.pos}" if member else f"byte {h.pos}"
        out.append(Finding(h.rule, h.severity, path, where, h.message, h.evidence))
    return out


@file_rule("*")
def pickle_rule(ctx: ScanContext, path: str, blob: Blob) -> list[Finding]:
    return scan_file(path, blob.data)
