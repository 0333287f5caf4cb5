"""A local stand-in for the Hugging Face Hub routes that `snapshot_download` uses.

It serves one or more model folders at given commit SHAs: the recursive tree listing
(`/api/models/{repo}/tree/{rev}`) and file downloads (`/{repo}/resolve/{rev}/{path}`) with
the headers the client reads (X-Repo-Commit, ETag, Content-Length). It records every
request, so tests can check what was (and was not) downloaded and that the token was sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, bytes]


@dataclass
class HubEmulator:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, auth

    def add_folder(self, repo_id: str, commit: str, folder: Path) -> None:
        files = {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }
        self.repos[repo_id] = Repo(repo_id, commit, files)

    def downloaded(self) -> set[str]:
        return {
            p.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, p, _ in self.requests
            if m == "GET" and "/resolve/" in p
        }

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.handle_any(send_body=False)

            def do_GET(self) -> None:
                self.handle_any(send_body=True)

            def handle_any(self, send_body: bool) -> None:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("authorization", "")))
                if path.startswith("/api/models/") and "/tree/" in path:
                    repo_id, rest = path[len("/api/models/") :].split("/tree/", 1)
                    repo = hub.repos.get(repo_id)
                    if repo is None or rest.split("/")[0] != repo.commit:
                        return self.reply(404, b'{"error":"not found"}', {})
                    entries = [_entry(name, data) for name, data in sorted(repo.files.items())]
                    return self.reply(200, json.dumps(entries).encode(), {}, send_body)
                if "/resolve/" in path:
                    repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                    rev, name = rest.split("/", 1)
                    repo = hub.repos.get(repo_id)
                    if repo is None or rev != repo.commit or name not in repo.files:
                        return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"})
                    data = repo.files[name]
                    headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_etag(name, data)}"'}
                    return self.reply(200, data, headers, send_body)
                return self.reply(404, b"", {})

            def reply(
                self, status: int, body: bytes, headers: dict[str, str], send_body: bool = True
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 200 and "/resolve/" not in self.path:
                    self.send_header("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".onnx"))


def _etag(name: str, data: bytes) -> str:
    if _is_lfs(name):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(name: str, data: bytes) -> dict:
    oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    entry: dict = {"type": "file", "oid": oid, "size": len(data), "path": name}
    if _is_lfs(name):
        entry["lfs"] = {
            "oid": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "pointerSize": 134,
        }
    return entry
