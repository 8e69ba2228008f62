"""What every sdsecure command line shares: one-line errors, exit codes, logging, atomic writes.

    exit 0    done / allowed
    exit 1    the gate blocked the model (SecurityError)
    exit 2    the user's input or environment is wrong (UserError, bad flags, I/O error), or the run
              could not complete
    exit 130  interrupted (Ctrl-C)

A mistake a user can make never prints a traceback. An unexpected exception (a bug) prints one line
too, and the traceback only with --debug or SDSECURE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from sdsecure.errors import SecurityError, UserError

EXIT_OK, EXIT_BLOCKED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("sdsecure")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or type(text).__name__


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("SDSECURE_DEBUG", "") not in ("", "0")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
        *, prog: str | None = None) -> int:
    """Call `main(argv)`, turning what can go wrong into one line on stderr and an exit code."""
    prefix = f"{prog}: " if prog else ""
    try:
        return main(argv)
    except SecurityError as e:
        print(f"{prefix}blocked: {_one_line(e)}", file=sys.stderr)
        return EXIT_BLOCKED
    except UserError as e:
        print(f"{prefix}error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:             # `... | head`: not an error of ours; silence the flush too
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_ERROR
    except OSError as e:                # disk full, permission denied, ...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{prefix}error: I/O error{where}: {_one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print(f"{prefix}error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - a bug: still one line unless debugging
        if debug_enabled(argv):
            raise
        print(f"{prefix}internal error: {type(e).__name__}: {_one_line(e)} "
              f"(run with --debug or SDSECURE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes, not to the one there when it was made
    (a test's captured stream, since closed; a GUI that redirects it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr(logger: logging.Logger, fmt: str, level: int) -> None:
    """`logger` writes to stderr in `fmt` from `level` on, through one handler of ours (replacing the one a
    previous call installed)."""
    for h in list(logger.handlers):
        if getattr(h, "_sdsecure", False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    handler._sdsecure = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


def setup_logging(verbosity: int = 0, *, quiet: bool = False) -> None:
    """Logs go to stderr (stdout stays for reports): warnings by default, -v info, -vv debug."""
    if quiet:
        level = logging.ERROR
    elif verbosity >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO if verbosity == 1 else logging.WARNING
    _log_to_stderr(logging.getLogger(), "%(levelname)s %(name)s: %(message)s", level)
    show_progress(quiet=quiet)


def show_progress(*, quiet: bool = False) -> None:
    """Progress on long work (the engine's "sdsecure.progress" log: a cold compile takes minutes) goes to
    stderr as plain "sdsecure:" lines, whatever the log level, unless `quiet`."""
    progress = logging.getLogger("sdsecure.progress")
    _log_to_stderr(progress, "sdsecure: %(message)s", logging.ERROR if quiet else logging.INFO)
    progress.propagate = False


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file in the same folder, fsync, rename): readers see
    the old file or the new one, never half of it. Raises UserError with one line on failure."""
    dest = Path(path)
    if dest.is_dir():
        raise UserError(f"cannot write {str(path)!r}: it is a directory")
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        tmp = None
    except OSError as exc:
        raise UserError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return dest
