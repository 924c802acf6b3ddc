"""A small stand-in for Kaggle's API, served on loopback, for the real `kaggle` client to talk to.

The client is pointed at it the supported way: KAGGLE_API_ENVIRONMENT=LOCALHOST makes it call http://localhost/api/v1
(Kaggle's own local set-up), and HTTP_PROXY / HTTPS_PROXY route every request of the process, that one included,
to this server. It records what was sent and answers as Kaggle does (JSON bodies, {"code", "message"} errors, a
redirect to the data archive, a resumable-upload URL). An https request (CONNECT) is refused: nothing leaves."""

from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

API = "/api/v1/"


@dataclass
class Competition:
    files: dict[str, bytes] = field(default_factory=dict)  # the data archive's members
    rules_accepted: bool = True
    daily_left: int = 5
    score: object = None  # callable(csv bytes) -> (public, private) as Kaggle shows them (strings)
    polls_to_score: int = 1  # ListSubmissions calls that still show a new submission as PENDING


@dataclass
class Sent:
    method: str
    path: str
    body: object
    headers: dict


class KaggleStandIn:
    def __init__(self, username: str = "tester", key: str = "secret", token: str = "KGAT_test"):
        self.username, self.key, self.token = username, key, token
        self.competitions: dict[str, Competition] = {}
        self.uploads: dict[str, bytes] = {}
        self.pending_uploads: dict[str, dict] = {}
        self.submissions: list[dict] = []
        self.sent: list[Sent] = []
        self.peers: set[str] = set()
        self.connects: list[str] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KaggleStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, home: Path, credentials: str = "key") -> dict:
        """The environment a client process needs to talk to this server only; `home` stands in for the user's."""
        env = {
            "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
            "HTTP_PROXY": f"http://127.0.0.1:{self.port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{self.port}",
            "http_proxy": f"http://127.0.0.1:{self.port}",
            "https_proxy": f"http://127.0.0.1:{self.port}",
            "NO_PROXY": "",
            "no_proxy": "",
            "HOME": str(home),
            "KAGGLE_CONFIG_DIR": str(home / ".kaggle"),
            "XDG_CONFIG_HOME": str(home / ".config"),
        }
        if credentials == "key":
            env |= {"KAGGLE_USERNAME": self.username, "KAGGLE_KEY": self.key}
        elif credentials == "token":
            env |= {"KAGGLE_API_TOKEN": self.token}
        return env

    def calls(self, name: str) -> list[Sent]:
        return [s for s in self.sent if s.path.endswith("/" + name)]

    # --- the API ------------------------------------------------------------------------------------------------

    def _signed_in(self, headers) -> bool:
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            return base64.b64decode(auth[6:]).decode() == f"{self.username}:{self.key}"
        return auth == f"Bearer {self.token}"

    def _competition(self, body: dict) -> Competition | None:
        return self.competitions.get(body.get("competitionName", ""))

    def answer(self, method: str, path: str, body, headers) -> tuple[int, dict, bytes]:
        if path == API + "security.OAuthService/IntrospectToken":
            active = body.get("token") == self.token
            return _json(200, {"active": active, "username": self.username if active else ""})
        if path.startswith("/upload/") and method == "PUT":
            token = path.rsplit("/", 1)[1]
            if token not in self.pending_uploads:
                return _json(404, {"code": 404, "message": "Upload not found"})
            self.uploads[token] = body
            return 200, {"Content-Type": "application/json"}, b"{}"
        if path.startswith("/files/") and method == "GET":
            slug = path.rsplit("/", 1)[1].removesuffix(".zip")
            data = _zip(self.competitions[slug].files)
            return 200, {"Content-Type": "application/zip", "Last-Modified": formatdate(usegmt=True)}, data
        if not path.startswith(API):
            return _json(404, {"code": 404, "message": "Not Found"})
        if not self._signed_in(headers):
            return _json(401, {"code": 401, "message": "Unauthenticated"})
        name = path.rsplit("/", 1)[1]
        comp = self._competition(body)
        if comp is None:
            return _json(404, {"code": 404, "message": "Competition not found"})
        slug = body["competitionName"]
        if name == "DownloadDataFiles":
            if not comp.rules_accepted:
                return _json(
                    403,
                    {
                        "code": 403,
                        "message": "You must accept this competition's rules before you'll be able to download files.",
                    },
                )
            return 302, {"Location": f"http://localhost/files/{slug}.zip", "Content-Length": "0"}, b""
        if name == "StartSubmissionUpload":
            token = f"blob{len(self.pending_uploads) + 1}"
            self.pending_uploads[token] = {"competition": slug, "file_name": body.get("fileName")}
            return _json(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
        if name == "CreateSubmission":
            if not comp.rules_accepted:
                return _json(
                    403,
                    {
                        "code": 403,
                        "message": "Submission not allowed: You must accept this "
                        "competition's rules before you can submit.",
                    },
                )
            if comp.daily_left <= 0:
                return _json(
                    400,
                    {
                        "code": 400,
                        "message": "Submission not allowed:  Your team has used its daily "
                        "Submission allowance (5) today, please try again tomorrow UTC (9 hours from now).",
                    },
                )
            token = body.get("blobFileTokens", "")
            if token not in self.uploads:
                return _json(400, {"code": 400, "message": "Uploaded file not found"})
            comp.daily_left -= 1
            ref = 50000 + len(self.submissions) + 1
            self.submissions.append(
                {
                    "ref": ref,
                    "competition": slug,
                    "fileName": self.pending_uploads[token]["file_name"],
                    "description": body.get("submissionDescription", ""),
                    "data": self.uploads[token],
                    "polls_left": comp.polls_to_score,
                    "date": "2026-12-03T12:00:00Z",
                }
            )
            return _json(200, {"message": f"Successfully submitted to {slug}", "ref": ref})
        if name == "ListSubmissions":
            out = []
            for s in reversed(self.submissions):
                if s["competition"] != slug:
                    continue
                row = {k: s[k] for k in ("ref", "fileName", "description", "date")}
                if s["polls_left"] > 0:
                    s["polls_left"] -= 1
                    row["status"] = "PENDING"
                else:
                    public, private = comp.score(s["data"])
                    row |= {"status": "COMPLETE", "publicScore": public, "privateScore": private}
                out.append(row)
            return _json(200, {"submissions": out})
        return _json(404, {"code": 404, "message": f"no such method {name}"})

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                standin.peers.add(self.client_address[0])
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                ctype = self.headers.get("Content-Type", "")
                body = json.loads(raw or b"{}") if "json" in ctype and not path.startswith("/upload/") else raw
                with standin._lock:
                    standin.sent.append(Sent(self.command, path, body, dict(self.headers)))
                    status, headers, data = standin.answer(self.command, path, body, self.headers)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

            def do_CONNECT(self):
                standin.connects.append(self.path)
                self.send_response(403)
                self.end_headers()

        return Handler


def _json(status: int, body: dict) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def folder_files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by its path relative to it: a competition's data archive."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
