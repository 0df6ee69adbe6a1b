"""A small Hugging Face Hub-compatible HTTP server for tests (standard library plus PyYAML).

It speaks the subset of the Hub API that `huggingface_hub` 2.x uses to create repos and branches, commit files,
list and download them, and validate card metadata, so tests can drive the real client against it:

    with HubServer(tmp_dir) as hub:
        env = {"HF_ENDPOINT": hub.url, ...}   # set before huggingface_hub is imported (it reads it at import)

Repos are keyed by type and id and hold branches pointing at commits; a commit is an immutable snapshot
`path -> blob oid`, blobs are stored content-addressed (git blob sha1) under the server's root directory.
Writes need `Authorization: Bearer <token>` with one of the server's tokens; private repos need it for reads too.
`inject_fault` makes matching requests fail with a given status, for error-path tests.

Run `python tests/hub_server.py` to start one by hand.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "test-user"
_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")  # namespace optional
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """The oid git (and the Hub) gives a regular file: sha1 of `blob <size>\\0<content>`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An error answer: status, message, and the `X-Error-Code` huggingface_hub maps to exception types."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass(frozen=True)
class Commit:
    oid: str
    files: dict[str, str]  # path -> blob oid


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch name, a full commit oid or an unambiguous prefix of at least 7 characters."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


@dataclass
class Fault:
    status: int
    message: str
    method: str | None
    path: re.Pattern[str] | None
    remaining: int | None  # None: every matching request

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or bool(self.path.search(path))
        )


@dataclass
class Request:
    """What the handler hands to a route: the parsed request and the authenticated user (or None)."""

    params: dict[str, str]
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    user: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}") from error


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), headers or {})


class HubServer:
    """The Hub on 127.0.0.1 at a free port; state lives in memory and blobs under `root`."""

    def __init__(
        self, root: str | Path, *, tokens: tuple[str, ...] = (DEFAULT_TOKEN,), user: str = DEFAULT_USER
    ):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = set(tokens)
        self.user = user
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self._repos: dict[tuple[str, str], Repo] = {}
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        repo = r"^/api/(?P<plural>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
        resolve = (
            r"^/(?:(?P<plural>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
        )
        routes: list[tuple[str, str, Callable[[Request], Response]]] = [
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("POST", repo + r"/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", repo + r"/commit/(?P<rev>[^/]+)$", self._commit),
            ("POST", repo + r"/branch/(?P<branch>[^/]+)$", self._create_branch),
            ("GET", repo + r"/refs$", self._refs),
            ("GET", repo + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", self._tree),
            ("GET", repo + r"(?:/revision/(?P<rev>[^/]+))?$", self._info),
            ("HEAD", resolve, self._resolve),
            ("GET", resolve, self._resolve),
        ]
        self._routes = [(method, re.compile(pattern), route) for method, pattern, route in routes]

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started.")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ test controls
    def inject_fault(
        self,
        status: int,
        message: str = "Injected failure",
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer `status` to requests matching `method` and the `path` regex, `times` times (None: until cleared)."""
        with self._lock:
            self._faults.append(Fault(status, message, method, re.compile(path) if path else None, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The content of every file of a repo at a revision, read from the server's own storage."""
        with self._lock:
            commit = self._get_repo(repo_type, repo_id, self.user).resolve(revision)
            return {path: self._blob(oid) for path, oid in commit.files.items()}

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._get_repo(repo_type, repo_id, self.user).branches)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._get_repo(repo_type, repo_id, self.user).private

    # ---------------------------------------------------------------- dispatch
    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Response:
        """Answer one request; requests are served one at a time (the lock), which is plenty for tests."""
        split = urlsplit(raw_path)
        try:
            with self._lock:
                self._raise_injected_fault(method, split.path)
                for route_method, pattern, route in self._routes:
                    match = pattern.match(split.path) if route_method == method else None
                    if match:
                        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        return route(
                            Request(params, parse_qs(split.query), headers, body, self._user(headers))
                        )
            raise HubError(404, f"No route for {method} {split.path} on this test server.")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            return _json({"error": error.message}, error.status, headers)

    def _raise_injected_fault(self, method: str, path: str) -> None:
        for fault in self._faults:
            if fault.matches(method, path) and fault.remaining != 0:
                if fault.remaining is not None:
                    fault.remaining -= 1
                raise HubError(fault.status, fault.message)

    def _user(self, headers: Any) -> str | None:
        authorization = headers.get("Authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            # The Hub's own wording: huggingface_hub then reports a plain HTTP error, not "repo not found".
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    @staticmethod
    def _require_user(request: Request) -> str:
        if request.user is None:
            raise HubError(401, "You must be authenticated to write to the Hub (no Authorization header).")
        return request.user

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        # A private repo is indistinguishable from a missing one without credentials, as on the Hub.
        if repo is None or (repo.private and user is None):
            status = 401 if user is None else 404
            raise HubError(status, f"Repository Not Found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _repo_for(self, request: Request) -> Repo:
        return self._get_repo(
            _TYPE_BY_PLURAL[request.params.get("plural", "models")], request.params["repo"], request.user
        )

    # ---------------------------------------------------------------- storage
    def _blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def _store(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        path = self.root / "blobs" / oid
        if not path.exists():
            path.write_bytes(content)
        return oid

    def _new_commit(self, repo: Repo, parent: Commit | None, summary: str, files: dict[str, str]) -> Commit:
        seed = json.dumps([repo.repo_id, parent.oid if parent else None, summary, files, next(self._counter)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), files)
        repo.commits[commit.oid] = commit
        return commit

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"

    # ------------------------------------------------------------------ routes
    def _create_repo(self, request: Request) -> Response:
        user = self._require_user(request)
        payload = request.json()
        name, namespace = payload.get("name"), payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not _REPO_NAME.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name {name!r}: use letters, digits, '-', '_' and '.'.")
        if repo_type not in _TYPE_BY_PLURAL.values():
            raise HubError(400, f"Invalid repo type {repo_type!r}.")
        repo_id = f"{namespace}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            return _json({"error": "You already created this repo", "url": self._repo_url(existing)}, 409)
        repo = Repo(
            repo_type, repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
        )
        # The Hub starts every repo with a commit holding .gitattributes.
        first = self._new_commit(
            repo, None, "initial commit", {".gitattributes": self._store(_GITATTRIBUTES)}
        )
        repo.branches["main"] = first.oid
        self._repos[(repo_type, repo_id)] = repo
        return _json({"url": self._repo_url(repo), "name": repo_id})

    def _validate_yaml(self, request: Request) -> Response:
        content = request.json().get("content")
        if not isinstance(content, str):
            raise HubError(400, "'content' must be the README.md text.")
        errors, warnings = validate_card_metadata(content)
        if "text/plain" in (request.headers.get("Accept") or ""):
            # RepoCard.validate asks for text and raises ValueError(response.text) on 400.
            text = "\n".join(errors)
            return Response(400 if errors else 200, text.encode(), content_type="text/plain; charset=utf-8")
        body = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        return _json(body, 400 if errors else 200)

    def _preupload(self, request: Request) -> Response:
        self._require_user(request)
        commit = self._repo_for(request).resolve(request.params["rev"])
        files = request.json().get("files", [])
        # Everything is a regular (base64-in-commit) file; `oid` lets the client skip unchanged files.
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": commit.files.get(f["path"]),
            }
            for f in files
        ]
        return _json({"files": answer, "commitOid": commit.oid})

    def _commit(self, request: Request) -> Response:
        self._require_user(request)
        repo = self._repo_for(request)
        branch = request.params["rev"]
        if request.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test server.")
        if branch not in repo.branches:
            raise HubError(404, f"Branch {branch!r} does not exist; create it first.", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        files = dict(head.files)
        header: dict[str, Any] | None = None
        for line in request.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding for {value.get('path')!r}.")
                files[value["path"]] = self._store(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(
                        404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound"
                    )
            else:
                raise HubError(
                    400, f"Unsupported commit operation {key!r} (this server only accepts regular files)."
                )
        if header is None or not header.get("summary"):
            raise HubError(400, "The commit needs a header line with a non-empty summary.")
        commit = self._new_commit(repo, head, header["summary"], files)
        repo.branches[branch] = commit.oid
        return _json(
            {
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "success": True,
            }
        )

    def _create_branch(self, request: Request) -> Response:
        self._require_user(request)
        repo = self._repo_for(request)
        branch = request.params["branch"]
        if branch.startswith("refs/") or not branch:
            raise HubError(400, f"Invalid branch name {branch!r}.")
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch!r} already exists.")
        repo.branches[branch] = repo.resolve(request.json().get("startingPoint") or "main").oid
        return Response(200, b"{}")

    def _refs(self, request: Request) -> Response:
        repo = self._repo_for(request)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in repo.branches.items()
        ]
        return _json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def _tree(self, request: Request) -> Response:
        commit = self._repo_for(request).resolve(request.params["rev"])
        base = request.params.get("path", "").strip("/")
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{base}/" if base else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, oid in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # A non-recursive listing shows the first level only: files there, and the folders holding the rest.
            folders = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
            for depth in folders:
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder, {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode())}
                )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(self._blob(oid)), "oid": oid}
        if base and not entries:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        return _json(list(entries.values()))

    def _info(self, request: Request) -> Response:
        repo = self._repo_for(request)
        commit = repo.resolve(request.params.get("rev", "main"))
        info: dict[str, Any] = {
            "id": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if "README.md" in commit.files:
            metadata = _front_matter(self._blob(commit.files["README.md"]).decode())
            if isinstance(metadata, dict):
                info["cardData"] = metadata
        return _json(info)

    def _resolve(self, request: Request) -> Response:
        repo = self._repo_for(request)
        commit = repo.resolve(request.params["rev"])
        path = request.params["path"]
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = self._blob(commit.files[path])
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{commit.files[path]}"', "Accept-Ranges": "none"}
        return Response(200, content, headers, content_type="application/octet-stream")


# --------------------------------------------------------------------- card metadata validation
def _front_matter(content: str) -> Any:
    """The parsed YAML block between the leading `---` lines, or None when the card has none."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
    return yaml.safe_load(match.group(1)) if match else None


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README's metadata, checking the keys the Hub checks for model cards."""
    try:
        metadata = _front_matter(content)
    except yaml.YAMLError as error:
        return [f"Invalid YAML in the metadata block: {error}"], []
    if metadata is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(metadata, dict):
        return ["The metadata block must be a YAML mapping."], []
    errors: list[str] = []
    for key in ("library_name", "pipeline_tag", "license_name", "license_link"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    if "license" in metadata and not (
        isinstance(metadata["license"], str) and _LICENSE_ID.match(metadata["license"])
    ):
        errors.append('"license" must be a license id such as "apache-2.0" or "other"')
    for key in ("tags", "datasets", "metrics", "language"):
        value = metadata.get(key)
        if value is not None and not _is_str_or_str_list(value):
            errors.append(f'"{key}" must be a string or a list of strings')
    base_model = metadata.get("base_model")
    if base_model is not None:
        ids = [base_model] if isinstance(base_model, str) else base_model
        if not _is_str_or_str_list(base_model) or not all(_MODEL_ID.match(i) for i in ids):
            errors.append('"base_model" must be a model id on the Hub (or a list of them), not a local path')
    if "model-index" in metadata:
        errors.extend(_model_index_errors(metadata["model-index"]))
    return errors, []


def _is_str_or_str_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _model_index_errors(model_index: Any) -> list[str]:
    if not isinstance(model_index, list) or not model_index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for i, entry in enumerate(model_index):
        where = f"model-index[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"{where}.name" is required and must be a string')
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f'"{where}.results" must be a list')
            continue
        for j, result in enumerate(results):
            here = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                errors.append(f'"{here}" must be a mapping')
                continue
            for section, keys in (("task", ("type",)), ("dataset", ("type", "name"))):
                block = result.get(section)
                for key in keys:
                    if not isinstance(block, dict) or not isinstance(block.get(key), str):
                        errors.append(f'"{here}.{section}.{key}" is required and must be a string')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{here}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                at = f"{here}.metrics[{k}]"
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str):
                    errors.append(f'"{at}.type" is required and must be a string')
                elif not isinstance(metric.get("value"), (int, float, str)) or isinstance(
                    metric.get("value"), bool
                ):
                    errors.append(f'"{at}.value" is required and must be a number or a string')
                elif "name" in metric and not isinstance(metric["name"], str):
                    errors.append(f'"{at}.name" must be a string')
    return errors


# ----------------------------------------------------------------------------- HTTP plumbing
class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        response = self.hub.handle(self.command, self.path, self.headers, body)
        self.hub.log.append((self.command, self.path, response.status))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # the request log lives in `HubServer.log`
        pass


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root, HubServer(root) as hub:
        print(f"Hub test server at {hub.url} (token {DEFAULT_TOKEN!r}); Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
