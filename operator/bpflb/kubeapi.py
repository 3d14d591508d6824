"""The one Kubernetes client module: the official `kubernetes` package, configured the way kubectl reads its
configuration (every $KUBECONFIG file merged, contexts, exec credential plugins, auth providers, the
in-cluster service account with its rotating token), behind a narrow path-based interface — get, list (in
pages), create, merge patch, delete and watch streams — that decodes raw JSON instead of building the
generated models (the agent lists and watches 10,000 Services). The agent's Kubernetes source, the
operator's API writes and the lab all go through it; kopf logs in with the same configuration
(connection_info).

Credentials never touch the disk: certificate and key data the kubernetes package would write to temporary
files are moved into memory files (memfd) that vanish with the process, even a killed one; and a bearer
token or password is never sent over plain http://."""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kubernetes.client
import urllib3
import yaml
from kubernetes.config import incluster_config, kube_config
from kubernetes.config.config_exception import ConfigException

log = logging.getLogger("bpflb.kubeapi")

KubeObject = dict[str, Any]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TIMEOUT = 10.0          # seconds for one request's answer (watches have their own)
CONNECT_TIMEOUT = 5.0
PAGE_SIZE = 500                 # objects per list page (limit/continue), as client-go's pager
TOKEN_REFRESH = 60.0            # the in-cluster token file is read again after this long (client-go's period)


class ApiError(Exception):
    """An API request that failed: HTTP status (0 when no answer came), the request and the server's reason."""

    def __init__(self, status: int, method: str, path: str, message: str, reason: str = "") -> None:
        super().__init__(f"{method} {path}: {'HTTP ' + str(status) + ': ' if status else ''}{message}")
        self.status = status
        self.method = method
        self.path = path
        self.message = message
        self.reason = reason


# -- configuration ---------------------------------------------------------------------------------------

_memfds: list[int] = []          # kept open for the life of the process: the paths below point at them


def _in_memory(path: str, name: str) -> str:
    """Move a credential file into a memory file; return the path by which the process reads it."""
    data = Path(path).read_bytes()
    fd = os.memfd_create(f"bpflb-{name}", os.MFD_CLOEXEC)
    os.write(fd, data)
    _memfds.append(fd)
    return f"/proc/self/fd/{fd}"


@dataclass
class ClientConfig:
    """A kubernetes.client.Configuration and where it came from (for messages)."""

    configuration: kubernetes.client.Configuration
    source: str                                  # "kubeconfig a:b (context x)", "in-cluster service account"
    refreshes: bool = False                      # the token can change (exec plugin, auth provider, in-cluster)

    @property
    def server(self) -> str:
        return str(self.configuration.host)


def anonymous(server: str) -> ClientConfig:
    """An unauthenticated client configuration (the lab's emulated API over http)."""
    cfg = kubernetes.client.Configuration()
    cfg.host = server.rstrip("/")
    return ClientConfig(cfg, source=server)


def _check_transport(cc: ClientConfig) -> ClientConfig:
    """Refuse credentials that would cross the network in the clear."""
    cfg = cc.configuration
    if str(cfg.host).startswith("http://") and (cfg.api_key or cfg.username or cfg.password):
        raise ValueError(f"{cc.source}: refusing to send credentials (a bearer token or password) to "
                         f"{cfg.host} over plain http://; the server must be https://")
    return cc


def _settle(cfg: kubernetes.client.Configuration, private_dir: str) -> None:
    """Move the credential files the kubernetes package wrote under private_dir into memory files."""
    for attr, name in (("ssl_ca_cert", "ca"), ("cert_file", "client-cert"), ("key_file", "client-key")):
        path = getattr(cfg, attr, None)
        if path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(private_dir):
            setattr(cfg, attr, _in_memory(path, name))


def _tune(cfg: kubernetes.client.Configuration) -> None:
    # Connection errors are retried twice at once (a pooled connection the server closed); anything else
    # is the caller's to retry, with its own backoff.
    cfg.retries = urllib3.Retry(total=2, connect=2, read=0, redirect=0, status=0, backoff_factor=0.05)
    cfg.connection_pool_maxsize = 16


def _kubeconfig_users(paths: list[str], context: str | None) -> dict[str, Any]:
    """The user entry the kubeconfig's (given or current) context names, read the way the merge does (first
    file that defines a name wins), for the checks the kubernetes package leaves out."""
    merged: dict[str, list[dict[str, Any]]] = {"contexts": [], "users": []}
    current = None
    for path in paths:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(doc, dict):
            continue
        current = doc.get("current-context") or current
        for section in ("contexts", "users"):
            for entry in doc.get(section) or []:
                if isinstance(entry, dict) and all(e.get("name") != entry.get("name") for e in merged[section]):
                    merged[section].append(entry)
    name = context or current
    ctx = next((c.get("context") or {} for c in merged["contexts"] if c.get("name") == name), {})
    user = next((u.get("user") or {} for u in merged["users"] if u.get("name") == ctx.get("user")), {})
    return user if isinstance(user, dict) else {}


def load_kubeconfig(path: str | os.PathLike[str] | None = None, context: str | None = None) -> ClientConfig:
    """A kubeconfig's (current or given) context: path, else every file of $KUBECONFIG merged (as kubectl
    does), else ~/.kube/config. ValueError naming the files and what is wrong."""
    spec = str(path) if path is not None else os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    paths = [os.path.expanduser(p) for p in spec.split(os.pathsep) if p]
    if not any(os.path.exists(p) for p in paths):
        raise ValueError(f"kubeconfig {spec}: no such file")
    where = f"kubeconfig {spec}" + (f" (context {context})" if context else "")
    user = _kubeconfig_users(paths, context)
    provider = (user.get("auth-provider") or {}).get("name") if isinstance(user.get("auth-provider"), dict) else None
    if provider is not None and provider not in ("oidc", "gcp"):
        raise ValueError(f"{where}: auth-provider {provider!r} is not supported (kubectl dropped it too); use "
                         "an exec credential plugin (users[].user.exec)")
    cfg = kubernetes.client.Configuration()
    private_dir = tempfile.mkdtemp(prefix="bpflb-kube-")      # 0700; emptied and removed below
    try:
        kube_config.load_kube_config(config_file=os.pathsep.join(paths), context=context,  # type: ignore[no-untyped-call]
                                     client_configuration=cfg, persist_config=False, temp_file_path=private_dir)
        _settle(cfg, private_dir)
    except ConfigException as exc:
        raise ValueError(f"{where}: {exc}") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{where}: cannot read: {exc}") from exc
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)
    if "exec" in user and not (cfg.api_key or cfg.cert_file):
        raise ValueError(f"{where}: the exec credential plugin {user['exec'].get('command')!r} gave no credential "
                         "(its error is logged above)")
    if not str(cfg.host).startswith(("http://", "https://")):
        raise ValueError(f"{where}: the cluster's server must be an http(s) URL; got {cfg.host!r}")
    _tune(cfg)
    refreshes = bool("exec" in user or provider or cfg.refresh_api_key_hook)
    return _check_transport(ClientConfig(cfg, source=where, refreshes=refreshes))


def in_cluster(service_account_dir: Path | None = None, token_refresh: float = TOKEN_REFRESH) -> ClientConfig:
    """The pod's service account (KUBERNETES_SERVICE_HOST/PORT, the mounted CA and token). The kubernetes
    package reads the token file again once token_refresh seconds have passed: projected tokens rotate."""
    directory = service_account_dir or SERVICE_ACCOUNT_DIR
    loader = incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(directory / "token"), cert_filename=str(directory / "ca.crt"))
    # The package fixes the period at a minute (client-go's too); tests shorten it to see a rotation.
    if not hasattr(loader, "_token_refresh_period"):
        raise RuntimeError("kubernetes.config.incluster_config changed: no _token_refresh_period to set")
    loader._token_refresh_period = datetime.timedelta(seconds=token_refresh)
    cfg = kubernetes.client.Configuration()
    try:
        loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise ValueError(f"in-cluster service account ({directory}): {exc}") from exc
    _tune(cfg)
    return _check_transport(ClientConfig(cfg, source=f"in-cluster service account ({directory})", refreshes=True))


def load_config(kubeconfig: str | os.PathLike[str] | None = None, context: str | None = None) -> ClientConfig:
    """A kubeconfig when given or when $KUBECONFIG is set, else the in-cluster service account when in a pod,
    else ~/.kube/config."""
    if kubeconfig is not None or os.environ.get("KUBECONFIG"):
        return load_kubeconfig(kubeconfig, context)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    return load_kubeconfig(None, context)


def write_kubeconfig(path: Path, server: str, name: str = "bpflb", *, token: str | None = None,
                     ca_file: str | None = None) -> None:
    """Write a minimal kubeconfig (the lab's emulated API; tests add a token and a CA)."""
    cluster: dict[str, Any] = {"server": server}
    if ca_file:
        cluster["certificate-authority"] = ca_file
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token} if token else {}}],
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


def backoff_delays(first: float, most: float) -> Iterator[float]:
    """Exponential backoff with full jitter: each delay drawn from [d/2, d], d doubling up to `most`, so
    that many clients losing the API at once do not come back in step."""
    delay = first
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, most)


@dataclass
class ConnectionInfo:
    """What kopf needs to log in as this client does (control.operator makes kopf.ConnectionInfo of it)."""

    server: str
    ca_path: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    scheme: str | None = None
    token: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    expiration: datetime.datetime | None = None   # when to ask again (rotating tokens), None: never


# -- the client ------------------------------------------------------------------------------------------


class KubeClient:
    """JSON to one API server through the kubernetes package's ApiClient (urllib3's connection pool, the
    configuration's credentials, refreshed as they rotate); thread-safe."""

    def __init__(self, config: ClientConfig, *, timeout: float = DEFAULT_TIMEOUT, user_agent: str = "bpflb",
                 page_size: int = PAGE_SIZE) -> None:
        self.config = config
        self.timeout = timeout
        self.page_size = page_size
        self.api = kubernetes.client.ApiClient(config.configuration)
        self.api.user_agent = user_agent
        self._lock = threading.Lock()        # the token refresh hook is not thread-safe

    @property
    def server(self) -> str:
        return self.config.server

    @property
    def source(self) -> str:
        return self.config.source

    def connection_info(self, refresh_every: float = TOKEN_REFRESH) -> ConnectionInfo:
        """The current credentials (a rotating token is read again first), for kopf's login handler."""
        cfg = self.config.configuration
        with self._lock:
            header = (cfg.get_api_key_with_prefix("BearerToken", alias="authorization") or "").strip()
        scheme, _, token = (header or "").partition(" ") if header and " " in header else (None, "", header)
        ca_data = cfg.ca_cert_data.decode() if isinstance(cfg.ca_cert_data, bytes) else cfg.ca_cert_data
        expiration = (datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=refresh_every)
                      if self.config.refreshes else None)
        return ConnectionInfo(server=self.server, ca_path=cfg.ssl_ca_cert, ca_data=ca_data,
                              insecure=not cfg.verify_ssl, scheme=scheme or None, token=token or None,
                              certificate_path=cfg.cert_file, private_key_path=cfg.key_file, expiration=expiration)

    def _send(self, method: str, path: str, body: Any, content_type: str | None,
              params: Mapping[str, str] | None, timeout: float | tuple[float, float] | None) -> Any:
        """One request; the raw urllib3 response (not read yet). ApiError when no answer came."""
        headers = {"Accept": "application/json"}
        if content_type and body is not None:
            headers["Content-Type"] = content_type
        try:
            with self._lock:
                method, url, headers, body, post = self.api.param_serialize(
                    method, path, query_params=list((params or {}).items()), header_params=headers, body=body,
                    auth_settings=["BearerToken"])
            if "authorization" in headers:      # token files often end in a newline, no part of a header
                headers["authorization"] = headers["authorization"].strip()
            answer = self.api.call_api(method, url, headers, body, post,
                                       _request_timeout=timeout or (CONNECT_TIMEOUT, self.timeout))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, method, path, f"cannot reach {self.server}: {_reason(exc)}") from exc
        except ConfigException as exc:       # an exec plugin or a token file that fails on refresh
            raise ApiError(0, method, path, f"credentials from {self.source}: {exc}") from exc
        return answer.response

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                params: Mapping[str, str] | None = None, timeout: float | None = None) -> Any:
        """One request; the decoded JSON answer. ApiError for HTTP errors and unreachable servers."""
        resp = self._send(method, path, body, content_type, params, timeout)
        try:
            data = resp.data
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, method, path, f"the answer from {self.server} broke off: {_reason(exc)}") from exc
        finally:
            resp.release_conn()
        if resp.status >= 400:
            reason, message = _status_message(data, resp.reason or "")
            raise ApiError(resp.status, method, path, message, reason)
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

    def list(self, path: str, *, reduce: Callable[[KubeObject], Any] | None = None,
             **params: str) -> tuple[list[Any], str | None]:
        """(every item, the list's resourceVersion), fetched page by page (limit/continue). A continue token
        that expired (410) starts the list again from the first page, as client-go's pager does. reduce: each
        item is handed to it as its page arrives and what it returns is kept instead (None: dropped), so a
        large list never holds every decoded object at once; the next page is asked for meanwhile (a thread
        waits for it), so reducing a page costs no time when the server is the slower of the two."""

        def page(token: str | None) -> KubeObject:
            query = {**params, "limit": str(self.page_size)}
            if token:
                query["continue"] = token
            answer: KubeObject = self.request("GET", path, params=query) or {}
            return answer

        items: list[Any] = []
        token: str | None = None
        version: str | None = None
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="list-page") if reduce is not None else None
        try:
            future = ahead.submit(page, None) if ahead is not None else None
            while True:
                try:
                    answer = future.result() if future is not None else page(token)
                except ApiError as exc:
                    if exc.status == 410 and token:
                        log.info("list %s: the continue token expired after %d objects; listing again", path,
                                 len(items))
                        items, token = [], None
                        future = ahead.submit(page, None) if ahead is not None else None
                        continue
                    raise
                meta = answer.get("metadata") or {}
                version = version or meta.get("resourceVersion")
                token = meta.get("continue") or None
                if token and ahead is not None:
                    future = ahead.submit(page, token)          # the next page comes while this one is reduced
                got = [i for i in answer.get("items") or [] if isinstance(i, dict)]
                del answer
                if reduce is not None:
                    got = [r for r in map(reduce, got) if r is not None]
                items.extend(got)
                if not token:
                    return items, meta.get("resourceVersion") or version
        finally:
            if ahead is not None:
                ahead.shutdown(wait=False, cancel_futures=True)

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
              read_timeout: float | None = None, stop: threading.Event | None = None,
              params: Mapping[str, str] | None = None,
              opened: Callable[[], None] | None = None) -> Iterator[KubeObject]:
        """Yield watch events ({"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}), decoded from
        the raw stream, from resource_version on (bookmarks asked for) until the server ends the stream.
        ApiError when the stream cannot be opened (410 when resource_version is too old) or breaks; opened()
        is called once the server has accepted it."""
        query = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds),
                 **(params or {})}
        if resource_version:
            query["resourceVersion"] = resource_version
        resp = self._send("GET", path, None, None, query,
                          (CONNECT_TIMEOUT, read_timeout or timeout_seconds + 30.0))
        try:
            if resp.status >= 400:
                reason, message = _status_message(resp.data, resp.reason or "")
                raise ApiError(resp.status, "WATCH", path, message, reason)
            if opened is not None:
                opened()
            buf = b""
            while stop is None or not stop.is_set():
                try:
                    chunk = resp.read1(65536)         # what has arrived (http.client undoes the chunking)
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise ApiError(0, "WATCH", path, f"stream broke: {_reason(exc)}") from exc
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError as exc:
                        raise ApiError(0, "WATCH", path, f"not a JSON event: {line[:80]!r}") from exc
                    if isinstance(event, dict):
                        yield event
        finally:
            resp.release_conn()
            resp.close()

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


def _reason(exc: BaseException) -> str:
    """The innermost reason of a urllib3 error (MaxRetryError wraps the one that counts)."""
    inner = getattr(exc, "reason", None)
    return str(inner if isinstance(inner, BaseException) else exc)


def _status_message(data: bytes, reason: str) -> tuple[str, str]:
    """(reason, message) of a Kubernetes Status answer, else the HTTP reason."""
    try:
        status = json.loads(data)
    except ValueError:
        return reason, reason or data[:200].decode(errors="replace")
    if isinstance(status, dict) and status.get("message"):
        return str(status.get("reason") or reason), str(status.get("reason") or reason) + ": " + str(status["message"])
    return reason, reason
