"""A local HTTP server that speaks the part of the Hugging Face Hub protocol that
``huggingface_hub`` uses to read models (repo info, file metadata, downloads with ranges),
serving repos the tests build in memory, bound to 127.0.0.1, and logging the bytes it served
per file. Point ``HF_ENDPOINT`` at :attr:`HubServer.url`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    """A model repo: commits (sha -> files) and branches (name -> sha)."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.token: str | None = None
        """When set, requests must carry ``Authorization: Bearer <token>`` (a gated repo)."""

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        sha = hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        )
        digest = sha.hexdigest()
        self.commits[digest] = dict(files)
        self.branches[branch] = digest
        return digest

    def sha(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a model folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class HubServer:
    """The server; repos by id, and the bytes served per ``repo/file`` (GET bodies)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.faults: dict[str, str] = {}
        """``repo/file`` -> a fault: ``cut`` (the body stops halfway), ``500``, ``loop``."""
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def weights_served(self, repo_id: str) -> dict[str, int]:
        """Bytes served of each safetensors file of ``repo_id``."""
        prefix = repo_id + "/"
        return {
            k[len(prefix) :]: v
            for k, v in self.served.items()
            if k.startswith(prefix) and k.endswith(".safetensors")
        }


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(
                status,
                body,
                {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
            )

        def _repo(self, repo_id: str) -> Repo | None:
            repo = server.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(
                    401 if not self.headers.get("Authorization") else 403,
                    "GatedRepo",
                    "Access to this repo is restricted",
                )
                return None
            return repo

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            server.requests.append((self.command, path))
            m = _INFO.match(path)
            if m:
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                sha = repo.sha(m["rev"] or "main")
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {m['rev']}")
                    return
                files = repo.commits[sha]
                names = server.faults.get(m["repo"] + "/__list__")
                listed = json.loads(names) if names else list(files)
                siblings = [{"rfilename": n, "size": len(files.get(n, b""))} for n in listed]
                info = {
                    "id": m["repo"],
                    "modelId": m["repo"],
                    "sha": sha,
                    "siblings": siblings,
                    "private": False,
                }
                self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                return
            m = _RESOLVE.match(path)
            if not m:
                self._error(404, "EntryNotFound", f"no route {path}")
                return
            repo = self._repo(m["repo"])
            if repo is None:
                return
            sha = repo.sha(m["rev"])
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {m['rev']}")
                return
            data = repo.commits[sha].get(m["path"])
            if data is None:
                self._error(404, "EntryNotFound", f"{m['path']} does not exist")
                return
            key = f"{m['repo']}/{m['path']}"
            fault = server.faults.get(key)
            if fault == "500":
                self._error(500, "Internal", "boom")
                return
            if fault == "loop":
                self._send(302, b"", {"Location": self.path})
                return
            etag = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            body, status = data, 200
            if rng:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start = int(a)
                end = min(int(b) + 1 if b else len(data), len(data))
                body, status = data[start:end], 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            cut = fault == "cut" and self.command == "GET" and not rng
            if self.command == "GET":
                server.served[key] += len(body) // 2 if cut else len(body)
            if cut:
                # Announce the whole body but send half of it, then drop the connection.
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                server.faults.pop(key)  # the next try succeeds
                self.close_connection = True
                return
            self._send(status, body, headers)

    return Handler
