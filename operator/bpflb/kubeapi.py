"""A small synchronous Kubernetes API client (stdlib http.client): credentials from a kubeconfig or the
in-cluster service account, JSON requests, merge patches, and watch streams. The agent's Kubernetes
source and the operator both use it; it has no dependency on kopf or on the kubernetes package."""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import yaml

KubeObject = dict[str, Any]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TIMEOUT = 10.0


class ApiError(Exception):
    """An API request that failed: HTTP status (0 when no answer came), the request and the server's reason."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: {'HTTP ' + str(status) + ': ' if status else ''}{message}")
        self.status = status
        self.method = method
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Credentials:
    """Where the API is and how to authenticate to it."""

    server: str                                 # https://host:port or http://host:port
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    insecure: bool = False
    source: str = ""                            # for messages: the kubeconfig path or "in-cluster"

    @property
    def host(self) -> str:
        return urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def https(self) -> bool:
        return urlsplit(self.server).scheme == "https"

    def bearer(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text().strip()   # re-read: projected tokens rotate
        return None


def _materialise(data_b64: str, suffix: str) -> str:
    """Write base64 inline kubeconfig data (certificate-authority-data, ...) to a private file."""
    fd, path = tempfile.mkstemp(prefix="bpflb-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data_b64))
    return path


def load_kubeconfig(path: str | os.PathLike[str] | None = None, context: str | None = None) -> Credentials:
    """Read credentials from a kubeconfig (default: $KUBECONFIG, else ~/.kube/config) for its current context.

    Supports server, certificate-authority(-data), client-certificate(-data), client-key(-data), token,
    tokenFile and insecure-skip-tls-verify. Raises ValueError naming the file and what is missing.
    """
    if path is None:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config"
    where = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"kubeconfig {where}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"kubeconfig {where}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"kubeconfig {where}: expected a mapping with clusters, users and contexts")  # noqa: TRY004

    def pick(section: str, name: str | None) -> dict[str, Any]:
        for entry in doc.get(section) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                inner = entry.get(section[:-1])
                return inner if isinstance(inner, dict) else {}
        raise ValueError(f"kubeconfig {where}: {section[:-1]} {name!r} is not defined in {section}")

    ctx = pick("contexts", context or doc.get("current-context"))
    cluster = pick("clusters", ctx.get("cluster"))
    user = pick("users", ctx.get("user")) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise ValueError(f"kubeconfig {where}: cluster {ctx.get('cluster')!r}: server must be an http(s) URL; "
                         f"got {server!r}")
    base = Path(path).parent

    def file_or_data(obj: dict[str, Any], key: str, suffix: str) -> str | None:
        if obj.get(f"{key}-data"):
            return _materialise(str(obj[f"{key}-data"]), suffix)
        if obj.get(key):
            return str(base / str(obj[key]))
        return None

    return Credentials(
        server=server.rstrip("/"),
        ca_file=file_or_data(cluster, "certificate-authority", ".crt"),
        cert_file=file_or_data(user, "client-certificate", ".crt"),
        key_file=file_or_data(user, "client-key", ".key"),
        token=user.get("token"),
        token_file=str(base / user["tokenFile"]) if user.get("tokenFile") else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        source=where,
    )


def in_cluster() -> Credentials:
    """Credentials of the pod's service account (KUBERNETES_SERVICE_HOST/PORT and the mounted token)."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ValueError("not in a cluster: KUBERNETES_SERVICE_HOST is not set; pass --kubeconfig")
    if ":" in host:
        host = f"[{host}]"
    return Credentials(server=f"https://{host}:{port}", ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
                       token_file=str(SERVICE_ACCOUNT_DIR / "token"), source="in-cluster service account")


def load_credentials(kubeconfig: str | os.PathLike[str] | None = None) -> Credentials:
    """A kubeconfig when given (or $KUBECONFIG is set), else the in-cluster service account."""
    if kubeconfig is not None or os.environ.get("KUBECONFIG"):
        return load_kubeconfig(kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    return load_kubeconfig(None)


def write_kubeconfig(path: Path, server: str, name: str = "bpflb") -> None:
    """Write a minimal kubeconfig for an unauthenticated API (the lab's emulated one)."""
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """/api/v1/namespaces/NS/PLURAL/NAME[/SUB] or /apis/GROUP/VERSION/..."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = root + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    """JSON over HTTP(S) to one API server; thread-safe (a connection per request, one per watch)."""

    def __init__(self, creds: Credentials, *, timeout: float = DEFAULT_TIMEOUT, user_agent: str = "bpflb") -> None:
        self.creds = creds
        self.timeout = timeout
        self.user_agent = user_agent
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                ctx = ssl.create_default_context(cafile=self.creds.ca_file)
                if self.creds.insecure:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                if self.creds.cert_file and self.creds.key_file:
                    ctx.load_cert_chain(self.creds.cert_file, self.creds.key_file)
                self._ssl = ctx
            return self._ssl

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.creds.https:
            return http.client.HTTPSConnection(self.creds.host, self.creds.port, timeout=timeout,
                                               context=self._context())
        return http.client.HTTPConnection(self.creds.host, self.creds.port, timeout=timeout)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if content_type:
            headers["Content-Type"] = content_type
        token = self.creds.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                params: Mapping[str, str] | None = None, timeout: float | None = None) -> Any:
        """One request; returns the decoded JSON answer. ApiError for HTTP errors and unreachable servers."""
        url = path + (f"?{urlencode(params)}" if params else "")
        payload = None if body is None else json.dumps(body).encode()
        conn = self._connection(timeout or self.timeout)
        try:
            conn.request(method, url, body=payload, headers=self._headers(content_type if payload else None))
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, method, path, f"cannot reach {self.creds.server}: {exc}") from exc
        finally:
            conn.close()
        if resp.status >= 400:
            raise ApiError(resp.status, method, path, _status_message(data, resp.reason))
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ApiError(resp.status, method, path, f"the answer is not JSON: {data[:80]!r}") from exc

    # -- verbs ------------------------------------------------------------------------------------------

    def get(self, path: str, **params: str) -> KubeObject | None:
        """The object at path, None when it does not exist (404)."""
        try:
            answer: KubeObject = self.request("GET", path, params=params or None)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return answer

    def list(self, path: str, **params: str) -> tuple[list[KubeObject], str | None]:
        """(items, the list's resourceVersion)."""
        answer = self.request("GET", path, params=params or None) or {}
        items = answer.get("items") or []
        return [i for i in items if isinstance(i, dict)], (answer.get("metadata") or {}).get("resourceVersion")

    def create(self, path: str, obj: KubeObject) -> KubeObject:
        answer: KubeObject = self.request("POST", path, obj)
        return answer

    def merge_patch(self, path: str, patch: KubeObject) -> KubeObject:
        answer: KubeObject = self.request("PATCH", path, patch, content_type="application/merge-patch+json")
        return answer

    def delete(self, path: str) -> bool:
        """Delete the object; False when it was already gone."""
        try:
            self.request("DELETE", path)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def watch(self, path: str, resource_version: str | None = None, *, timeout_seconds: int = 300,
              read_timeout: float = 330.0, stop: threading.Event | None = None,
              params: Mapping[str, str] | None = None) -> Iterator[KubeObject]:
        """Yield watch events ({"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}) until the
        server ends the stream. ApiError when the stream cannot be opened or breaks."""
        query = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds),
                 **(params or {})}
        if resource_version:
            query["resourceVersion"] = resource_version
        url = f"{path}?{urlencode(query)}"
        conn = self._connection(read_timeout)
        try:
            try:
                conn.request("GET", url, headers=self._headers(None))
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ApiError(0, "WATCH", path, f"cannot reach {self.creds.server}: {exc}") from exc
            if resp.status >= 400:
                raise ApiError(resp.status, "WATCH", path, _status_message(resp.read(), resp.reason))
            while stop is None or not stop.is_set():
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise ApiError(0, "WATCH", path, f"stream broke: {exc}") from exc
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise ApiError(0, "WATCH", path, f"not a JSON event: {line[:80]!r}") from exc
                if isinstance(event, dict):
                    yield event
        finally:
            conn.close()

    def wait_reachable(self, deadline: float) -> bool:
        """Poll /version until it answers or the monotonic deadline passes."""
        while True:
            try:
                self.request("GET", "/version", timeout=1.0)
                return True
            except ApiError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)


def _status_message(data: bytes, reason: str) -> str:
    """The message of a Kubernetes Status answer, else the HTTP reason."""
    try:
        status = json.loads(data)
    except ValueError:
        return reason or data[:200].decode(errors="replace")
    if isinstance(status, dict) and status.get("message"):
        return str(status.get("reason") or reason) + ": " + str(status["message"])
    return reason
