"""A small Hugging Face Hub of our own on 127.0.0.1, for the real huggingface_hub client (HF_ENDPOINT).

It serves fixture repos (any local folder, under a fake commit sha and a branch name) with the
endpoints huggingface_hub 2.x uses for model_info, snapshot_download and get_paths_info:

    GET  /api/models/{repo}[/revision/{rev}]      ?securityStatus=1&blobs=1  -> sha, siblings (+lfs), securityRepoStatus
    GET  /api/models/{repo}/tree/{rev}[/{path}]   ?recursive=1               -> [{type, path, size, oid, lfs}]
    POST /api/models/{repo}/paths-info/{rev}      paths=..&expand=..         -> same entries for the given paths
    HEAD/GET /{repo}/resolve/{rev}/{path}         X-Repo-Commit, ETag, Content-Length (git files);
                                                  LFS files: 302 to a "CDN" on a second port, with
                                                  X-Linked-Etag / X-Linked-Size, like the real Hub
    GET  /lfs/{org}--{name}/{sha256}              (the CDN) the bytes, with Range support

A repo can be tampered with (`serve_instead`): the metadata keeps the published hashes while the
bytes served differ, as a hostile mirror or a corrupted transfer would. Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".onnx", ".pb", ".bin", ".safetensors", ".onnx_data", ".data", ".ckpt", ".pt", ".pth",
                ".pkl", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 << 20


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]                    # published content
    lfs: set[str]                              # which paths are LFS
    served: dict[str, bytes] = field(default_factory=dict)   # tampered bytes served instead

    def body(self, path: str) -> bytes:
        return self.served.get(path, self.files[path])

    def entry(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        e: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
        if path in self.lfs:
            ptr = lfs_pointer(data)
            e["oid"] = git_oid(ptr)
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(ptr)}
        else:
            e["oid"] = git_oid(data)
        return e

    def dirs(self) -> set[str]:
        out = set()
        for p in self.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    security_status: dict[str, Any] | None = None
    siblings_metadata: bool = True          # False: model_info ignores blobs=1 (forces paths-info)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return self.commits.get(sha)


class HubServer:
    """Start with `with HubServer() as hub:` or .start()/.stop(). `hub.url` goes into HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_all = False                # answer 503 to everything (Hub down)
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = ""
        self.cdn_url = ""

    # -- fixture repos ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str | os.PathLike | None = None, *, files: dict[str, bytes] | None = None,
                 branch: str = "main", sha: str | None = None, lfs: set[str] | None = None,
                 security_status: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
        """Publish a commit of `folder` (or `files`) on `branch`; returns its (fake) commit sha."""
        content = dict(files or {})
        if folder is not None:
            root = Path(folder)
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    content[p.relative_to(root).as_posix()] = p.read_bytes()
        if lfs is None:
            lfs = {p for p, d in content.items() if p.endswith(LFS_SUFFIXES) or len(d) >= LFS_MIN_SIZE}
        if sha is None:
            h = hashlib.sha1(repo_id.encode())
            for p in sorted(content):
                h.update(p.encode() + b"\0" + hashlib.sha256(content[p]).digest())
            sha = h.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.commits[sha] = Commit(sha, content, set(lfs))
        repo.refs[branch] = sha
        for tag in (tags or {}):
            repo.refs[tag] = sha
        if security_status is not None:
            repo.security_status = security_status
        return sha

    def serve_instead(self, repo_id: str, path: str, data: bytes, rev: str = "main") -> None:
        """Serve other bytes for `path` while all metadata keeps the published hashes."""
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None and path in commit.files
        commit.served[path] = data

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        for attr in ("url", "cdn_url"):
            srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, name=f"hubserver-{attr}", daemon=True).start()
            self._servers.append(srv)
            setattr(self, attr, f"http://127.0.0.1:{srv.server_address[1]}")
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _route(self) -> None:
        hub = self.server_hub
        with hub._lock:
            hub.requests.append((self.command, self.path))
        if hub.fail_all:
            return self._error(503, "ServiceUnavailable", "Hub is down")
        url = urlsplit(self.path)
        raw = url.path.split("/")[1:]          # still percent-encoded: revisions may contain %2F
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if raw[:2] == ["api", "models"] and len(raw) >= 4:
                repo_id = f"{unquote(raw[2])}/{unquote(raw[3])}"
                rest = raw[4:]
                if not rest and self.command == "GET":
                    return self._model_info(repo_id, "main", query)
                if len(rest) == 2 and rest[0] == "revision" and self.command == "GET":
                    return self._model_info(repo_id, unquote(rest[1]), query)
                if len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                    return self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), query)
                if len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                    return self._paths_info(repo_id, unquote(rest[1]))
            elif raw[:1] == ["lfs"] and len(raw) == 3 and self.command in ("GET", "HEAD"):
                return self._cdn(unquote(raw[1]), raw[2])
            elif len(raw) >= 5 and raw[2] == "resolve" and self.command in ("GET", "HEAD"):
                repo_id = f"{unquote(raw[0])}/{unquote(raw[1])}"
                return self._resolve(repo_id, unquote(raw[3]), unquote("/".join(raw[4:])))
        except BrokenPipeError:
            return None
        return self._error(404, "NotFound", f"no route for {self.command} {url.path}")

    do_GET = do_HEAD = do_POST = _route

    def _repo_commit(self, repo_id: str, rev: str) -> tuple[Repo | None, Commit | None]:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None, None
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return repo, None
        return repo, commit

    # -- endpoints -------------------------------------------------------------------------------
    def _model_info(self, repo_id: str, rev: str, query: dict[str, str]) -> None:
        repo, commit = self._repo_commit(repo_id, rev)
        if commit is None:
            return
        blobs = _truthy(query.get("blobs")) and repo.siblings_metadata
        siblings = []
        for path in sorted(commit.files):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                e = commit.entry(path)
                s["size"] = e["size"]
                s["blobId"] = e["oid"]
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["lfs"]["size"],
                                "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(s)
        doc: dict[str, Any] = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                               "modelId": repo_id, "author": repo_id.split("/")[0], "sha": commit.sha,
                               "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                               "tags": ["onnx"], "lastModified": "2026-01-01T00:00:00.000Z",
                               "createdAt": "2025-01-01T00:00:00.000Z", "siblings": siblings}
        if _truthy(query.get("securityStatus")) and repo.security_status is not None:
            doc["securityRepoStatus"] = repo.security_status
        self._json(doc)

    def _entries(self, commit: Commit, paths: list[str]) -> list[dict[str, Any]]:
        dirs = commit.dirs()
        out = []
        for p in paths:
            if p in commit.files:
                out.append(commit.entry(p))
            elif p in dirs:
                out.append({"type": "directory", "path": p, "size": 0,
                            "oid": hashlib.sha1(f"tree {p} {commit.sha}".encode()).hexdigest()})
        return out

    def _tree(self, repo_id: str, rev: str, base: str, query: dict[str, str]) -> None:
        _, commit = self._repo_commit(repo_id, rev)
        if commit is None:
            return
        base = base.strip("/")
        prefix = base + "/" if base else ""
        names = sorted(set(commit.files) | commit.dirs())
        below = [n for n in names if n.startswith(prefix)]
        if base and not below:
            return self._error(404, "EntryNotFound", f"{base} does not exist", {"X-Repo-Commit": commit.sha})
        if not _truthy(query.get("recursive")):
            below = [n for n in below if "/" not in n[len(prefix):]]
        self._json(self._entries(commit, below))

    def _paths_info(self, repo_id: str, rev: str) -> None:
        _, commit = self._repo_commit(repo_id, rev)
        if commit is None:
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        self._json(self._entries(commit, [p.strip("/") for p in paths]))

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        _, commit = self._repo_commit(repo_id, rev)
        if commit is None:
            return
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit.sha})
        e = commit.entry(path)
        if "lfs" in e:
            sha256 = e["lfs"]["oid"]
            loc = f"{self.server_hub.cdn_url}/lfs/{quote(repo_id.replace('/', '--'))}/{sha256}?commit={commit.sha}&path={quote(path)}"
            return self._send(302, b"", {"Location": loc, "X-Repo-Commit": commit.sha, "ETag": f'"{e["oid"]}"',
                                         "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(e["size"]),
                                         "Content-Length": "0"})
        self._body(commit.body(path), {"X-Repo-Commit": commit.sha, "ETag": f'"{e["oid"]}"'})

    def _cdn(self, folder: str, sha256: str) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        repo = self.server_hub.repos.get(folder.replace("--", "/", 1))
        commit = repo.commits.get(query.get("commit", "")) if repo else None
        path = query.get("path", "")
        if commit is None or path not in commit.files or commit.entry(path).get("lfs", {}).get("oid") != sha256:
            return self._send(403, b"<Error>AccessDenied</Error>", content_type="application/xml")
        self._body(commit.body(path), {"ETag": f'"{sha256}"'}, content_type="binary/octet-stream")

    def _body(self, data: bytes, headers: dict[str, str], content_type: str = "application/octet-stream") -> None:
        rng = self.headers.get("Range")
        headers = {**headers, "Accept-Ranges": "bytes"}
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].split(",")[0].partition("-")
            start = int(start_s or 0)
            end = min(int(end_s), len(data) - 1) if end_s else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            part = data[start:end + 1]
            return self._send(206, part, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}",
                                          "Content-Length": str(len(part))}, content_type)
        self._send(200, data, {**headers, "Content-Length": str(len(data))}, content_type)


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in {"1", "true", "yes", "on"}


@pytest.fixture(scope="module")
def hub_server():
    """One Hub server per test module (add repos to it in the tests)."""
    with HubServer() as hub:
        yield hub


@pytest.fixture
def hub_env(hub_server, tmp_path, monkeypatch):
    """HF_ENDPOINT -> our server, a fresh HF_HOME per test, online."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "SDSECURE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub_server.fail_all = False
    hub_server.clear_log()
    return hub_server


# -- fixture repos ---------------------------------------------------------------------------------

def make_plain_model(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A small benign non-SD model folder: model.onnx (MatMul + Add) whose weights live in
    weights.pb (external data), a config.json and a README.md."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((16,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
         helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sdsecure-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.pb", size_threshold=0)
    (root / "config.json").write_text('{"hidden_size": 16}\n')
    (root / "README.md").write_text("# plain test model\n")
    return root
