"""Open the streamlit GUI in headless Chromium and save a screenshot and the rendered DOM.

    python tools/screenshot_gui.py --output out/gui.png --dom out/gui.html
    python tools/screenshot_gui.py --query "model=embedded&validate=1" --wait-for "Verdict:"

Starts `streamlit run python/stable-diffusion.py` on 127.0.0.1 (a free port, headless, no usage
statistics), then drives Debian's `chromium` over the DevTools protocol on a pipe
(--remote-debugging-pipe: no extra port, no websocket library). A streamlit page renders over a
websocket after the script has run, so a one-shot `chromium --screenshot` or `--dump-dom` fires
before the report is there (virtual time does not wait for websockets): we poll the page until the
expected text is shown and the app has stopped running, then capture.

Exit status: 0 captured, 2 could not (no chromium, app did not start, text never appeared).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "python" / "stable-diffusion.py"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
]


class CaptureError(Exception):
    pass


def find_chromium() -> str | None:
    explicit = os.environ.get("SDSECURE_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_app(port: int, log_path: Path, app: Path = APP, timeout: float = 120.0) -> Iterator[str]:
    """The GUI served on 127.0.0.1:port; yields its base URL; stops it on exit."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(app),
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise CaptureError(f"streamlit exited with {proc.returncode}: see {log_path}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CaptureError(f"streamlit did not answer on {base} within {timeout:.0f} s: see {log_path}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _above_stdio_fds(fd: int) -> int:
    """The same pipe end on a close-on-exec descriptor >= 10, so dup2 onto 3 and 4 cannot clobber it."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """Chromium driven over --remote-debugging-pipe: JSON messages, NUL-terminated, on fds 3 and 4."""

    def __init__(self, chromium: str, profile: Path, log_path: Path):
        to_child_r, self._to_child = map(_above_stdio_fds, os.pipe())
        self._from_child, from_child_w = map(_above_stdio_fds, os.pipe())

        def wire_fds() -> None:   # in the child: fd 3 reads our commands, fd 4 writes its replies
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        # close_fds=False keeps the dup2'ed 3 and 4; every other descriptor of ours is close-on-exec.
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=wire_fds,
            close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.session: str | None = None

    def close(self) -> None:
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise CaptureError("chromium closed the DevTools pipe (see its log)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if not browser and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CaptureError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open_page(self, width: int, height: int) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")


# The app is done when the expected text is on the page and streamlit's "Running..." widget is gone.
_PAGE_STATE = """JSON.stringify({
  text: document.body ? document.body.innerText : "",
  running: !!document.querySelector('[data-testid="stStatusWidget"]') &&
           /running/i.test(document.querySelector('[data-testid="stStatusWidget"]').innerText)
})"""


def capture(url: str, png: Path, dom: Path | None, wait_for: list[str], *, width: int, height: int,
            timeout: float, chromium: str, work: Path) -> str:
    """Load `url`, wait until every string in `wait_for` shows and the app is idle, save the
    screenshot (and the DOM); returns the page's visible text."""
    tools = DevTools(chromium, work / "profile", work / "chromium.log")
    try:
        tools.open_page(width, height)
        tools.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        stable_since, last_text = None, None
        while True:
            page = json.loads(tools.evaluate(_PAGE_STATE) or "{}")
            text = page.get("text", "")
            ready = all(w in text for w in wait_for) and not page.get("running")
            if ready and text == last_text:
                if stable_since is not None and time.monotonic() - stable_since > 1.0:
                    break
            else:
                stable_since = time.monotonic() if ready else None
            last_text = text
            if time.monotonic() > deadline:
                missing = [w for w in wait_for if w not in text]
                raise CaptureError(f"page not ready after {timeout:.0f} s (missing {missing}); it shows:\n"
                                   + text[:2000])
            time.sleep(0.5)
        shot = tools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(shot["data"]))
        if dom is not None:
            dom.parent.mkdir(parents=True, exist_ok=True)
            dom.write_text(tools.evaluate("document.documentElement.outerHTML"), encoding="utf-8")
        return text
    finally:
        tools.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="out/gui.png", help="screenshot PNG (default: out/gui.png)")
    ap.add_argument("--dom", default=None, help="also save the rendered DOM (HTML) here")
    ap.add_argument("--query", default="model=embedded&validate=1", help="query string for the app")
    ap.add_argument("--wait-for", action="append", default=None,
                    help="text that must be on the page before capturing (repeatable; default 'Verdict:')")
    ap.add_argument("--app", default=str(APP), help="streamlit script (default: the sdsecure GUI)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1600)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the page (default 300)")
    args = ap.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print("error: chromium not found (apt-get install -y chromium, or set SDSECURE_CHROMIUM)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sdsecure-shot-") as tmp:
        work = Path(tmp)
        try:
            with streamlit_app(free_port(), work / "streamlit.log", Path(args.app)) as base:
                capture(f"{base}/?{args.query}", Path(args.output), Path(args.dom) if args.dom else None,
                        args.wait_for or ["Verdict:"], width=args.width, height=args.height,
                        timeout=args.timeout, chromium=chromium, work=work)
        except CaptureError as exc:
            print(f"error: {exc}", file=sys.stderr)
            for log in ("streamlit.log", "chromium.log"):
                p = work / log
                if p.exists():
                    print(f"--- {log} (tail) ---\n" + p.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 2
    print(f"screenshot: {args.output}" + (f"\ndom: {args.dom}" if args.dom else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
