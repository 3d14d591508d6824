"""Every kubeconfig kubectl accepts, against the emulated API over https (a CA of the test's own; the API
records the Authorization header of every request): a token, an exec credential plugin (fetched again when
its credential expires), several KUBECONFIG paths merged, the in-cluster service account with a token file
that rotates, an OIDC auth provider; a plugin that fails, an auth provider kubectl dropped, and a token
over plain http are refused with what is wrong. No credential file outlives the process, not even a killed
one."""

from __future__ import annotations

import base64
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bpflb import kubeapi
from bpflb.kubeapi import KubeClient, in_cluster, load_config, load_kubeconfig
from bpflb_lab.apiserver import EmulatedAPI, TLSFiles
from tests.control.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def kubeconfig(server: str, user: dict[str, Any], *, ca: Path | None = None, name: str = "lab",
               current: bool = True) -> dict[str, Any]:
    cluster: dict[str, Any] = {"server": server}
    if ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Config",
                           "clusters": [{"name": name, "cluster": cluster}],
                           "users": [{"name": name, "user": user}],
                           "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]}
    if current:
        doc["current-context"] = name
    return doc


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def tokens_seen(api: EmulatedAPI, path: str = "/api/v1/nodes") -> list[str | None]:
    return [r.authorization for r in api.requests() if r.path == path]


def exec_plugin(tmp_path: Path, *, expires_in: float = 3600.0, fail: bool = False, cert: tuple[str, str] | None = None
                ) -> dict[str, Any]:
    """A kubeconfig exec section running a tiny plugin: it prints an ExecCredential whose token counts the
    runs (token-1, token-2, ...), valid for expires_in seconds (or a client certificate; or fails)."""
    script = tmp_path / "credential-plugin"
    script.write_text(f"""#!{sys.executable}
import datetime, json, os, pathlib, sys
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
assert info["kind"] == "ExecCredential", info
if {fail!r}:
    print("the identity provider said no", file=sys.stderr)
    sys.exit(3)
runs = pathlib.Path(os.environ["PLUGIN_RUNS"])
n = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(n))
until = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds={expires_in!r})
status = {{"token": f"token-{{n}}", "expirationTimestamp": until.strftime("%Y-%m-%dT%H:%M:%SZ")}}
cert = {cert!r}
if cert:
    status = {{"clientCertificateData": cert[0], "clientKeyData": cert[1]}}
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}}))
""")
    script.chmod(0o755)
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(script),
                     "env": [{"name": "PLUGIN_RUNS", "value": str(tmp_path / "runs")}], "interactiveMode": "Never"}}


def client_certificate(tls: TLSFiles) -> tuple[str, str]:
    """A client certificate and its key (PEM), signed by nobody the server asks for: it is the files that
    count here, not the handshake."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "system:node:node1")])
    now = datetime.datetime.now(tz=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)


def test_a_token_goes_over_https_verified_by_the_kubeconfig_ca(tls_api: EmulatedAPI, tls: TLSFiles,
                                                               tmp_path: Path) -> None:
    path = write(tmp_path / "config", kubeconfig(tls_api.url, {"token": "s3cret"}, ca=tls.ca))
    client = KubeClient(load_config(str(path)))
    assert client.list("/api/v1/nodes")[0] == []
    assert tokens_seen(tls_api) == ["Bearer s3cret"]

    # Without the CA the server's certificate is not trusted: no request is made with the token.
    untrusted = write(tmp_path / "untrusted", kubeconfig(tls_api.url, {"token": "s3cret"}))
    with pytest.raises(kubeapi.ApiError, match="CERTIFICATE_VERIFY_FAILED"):
        KubeClient(load_config(str(untrusted))).list("/api/v1/nodes")


def test_exec_plugin_credentials_are_used_and_fetched_again_when_they_expire(
        tls_api: EmulatedAPI, tls: TLSFiles, tmp_path: Path) -> None:
    path = write(tmp_path / "config", kubeconfig(tls_api.url, exec_plugin(tmp_path), ca=tls.ca))
    client = KubeClient(load_config(str(path)))
    client.list("/api/v1/nodes")
    client.list("/api/v1/nodes")
    assert tokens_seen(tls_api) == ["Bearer token-1", "Bearer token-1"]      # valid for an hour: kept

    # A credential that expires (within the client's five-minute margin) is fetched again before use.
    short = tmp_path / "short"
    short.mkdir()
    path = write(tmp_path / "config-short", kubeconfig(tls_api.url, exec_plugin(short, expires_in=60), ca=tls.ca))
    client = KubeClient(load_config(str(path)))
    client.list("/api/v1/nodes")
    client.list("/api/v1/nodes")
    assert tokens_seen(tls_api)[2:] == ["Bearer token-2", "Bearer token-3"]


def test_a_failing_exec_plugin_is_an_error_that_names_it(tls_api: EmulatedAPI, tls: TLSFiles,
                                                         tmp_path: Path) -> None:
    path = write(tmp_path / "config", kubeconfig(tls_api.url, exec_plugin(tmp_path, fail=True), ca=tls.ca))
    with pytest.raises(ValueError, match=r"exec credential plugin '.*credential-plugin' gave no credential"):
        load_config(str(path))


def test_several_kubeconfig_paths_are_merged_first_file_first(tls_api: EmulatedAPI, tls: TLSFiles,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    # The first file names the context and holds the cluster; the user is only in the second; a third file
    # defines the same user again, and the first definition wins (kubectl's rule).
    first = kubeconfig(tls_api.url, {}, ca=tls.ca)
    del first["users"]
    second = kubeconfig("https://192.0.2.1:6443", {"token": "from-the-second-file"}, current=False)
    del second["clusters"]
    third = kubeconfig("https://192.0.2.1:6443", {"token": "from-the-third-file"}, current=False)
    paths = [write(tmp_path / f"config-{i}", doc) for i, doc in enumerate((first, second, third))]
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "missing"), *map(str, paths)]))
    client = KubeClient(load_config())
    client.list("/api/v1/nodes")
    assert tokens_seen(tls_api) == ["Bearer from-the-second-file"]
    assert str(paths[0]) in client.source


def test_the_in_cluster_token_is_read_again_when_it_rotates(tls_api: EmulatedAPI, tls: TLSFiles, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(tls.ca.read_bytes())
    (sa / "token").write_text("first-token\n")             # kubelet's files may end in a newline
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", tls_api.host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_api.port))
    monkeypatch.setattr(kubeapi, "SERVICE_ACCOUNT_DIR", sa)
    assert load_config().source.startswith("in-cluster service account")     # chosen without a kubeconfig

    client = KubeClient(in_cluster(sa, token_refresh=0.2))
    client.list("/api/v1/nodes")
    assert tokens_seen(tls_api) == ["bearer first-token"]
    # The kubelet rotates the projected token by swapping the file.
    (sa / "token.new").write_text("second-token")
    (sa / "token.new").replace(sa / "token")
    wait_for("a request with the rotated token",
             lambda: client.list("/api/v1/nodes") and tokens_seen(tls_api)[-1] == "bearer second-token")
    assert set(tokens_seen(tls_api)) == {"bearer first-token", "bearer second-token"}


def test_an_oidc_auth_provider_token_is_sent(tls_api: EmulatedAPI, tls: TLSFiles, tmp_path: Path) -> None:
    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    expiry = int((datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(hours=1)).timestamp())
    id_token = f"{b64({'alg': 'none'})}.{b64({'sub': 'dev', 'exp': expiry})}.signature"
    user = {"auth-provider": {"name": "oidc", "config": {"id-token": id_token, "client-id": "kubernetes",
                                                          "idp-issuer-url": "https://issuer.invalid"}}}
    client = KubeClient(load_config(str(write(tmp_path / "config", kubeconfig(tls_api.url, user, ca=tls.ca)))))
    client.list("/api/v1/nodes")
    assert tokens_seen(tls_api) == [f"Bearer {id_token}"]


def test_an_auth_provider_kubectl_dropped_is_refused(tmp_path: Path) -> None:
    user = {"auth-provider": {"name": "azure", "config": {"access-token": "x"}}}
    path = write(tmp_path / "config", kubeconfig("https://192.0.2.1:6443", user))
    with pytest.raises(ValueError, match="auth-provider 'azure' is not supported.*exec credential plugin"):
        load_config(str(path))


@pytest.mark.parametrize("user", [{"token": "s3cret"}, {"username": "admin", "password": "pw"}],
                         ids=["token", "password"])
def test_no_credential_is_sent_over_plain_http(api: EmulatedAPI, tmp_path: Path, user: dict[str, Any]) -> None:
    path = write(tmp_path / "config", kubeconfig(api.url, user))
    with pytest.raises(ValueError, match=r"refusing to send credentials .* over plain http://"):
        load_config(str(path))
    assert api.requests() == []
    # Without credentials plain http is fine (the lab's API).
    assert KubeClient(load_config(str(write(tmp_path / "anon", kubeconfig(api.url, {}))))).list("/api/v1/nodes")[0] == []


def test_a_missing_kubeconfig_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kubeconfig .*nowhere: no such file"):
        load_kubeconfig(tmp_path / "nowhere")


LOADER = """
import sys
from bpflb.kubeapi import KubeClient, load_config
client = KubeClient(load_config(sys.argv[1]))
client.list("/api/v1/nodes")
cfg = client.config.configuration
print(cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file, flush=True)
sys.stdin.read()           # until the test kills it
"""


@pytest.mark.parametrize("where", ["kubeconfig", "exec-plugin"])
def test_no_credential_file_outlives_the_process(tls_api: EmulatedAPI, tls: TLSFiles, tmp_path: Path,
                                                 where: str) -> None:
    """Inline certificate and key data (a kubeconfig's, or an exec plugin's answer) live in memory files:
    nothing is left in TMPDIR while the process runs, nor after it is killed."""
    cert, key = client_certificate(tls)
    if where == "kubeconfig":
        user = {"client-certificate-data": base64.b64encode(cert.encode()).decode(),
                "client-key-data": base64.b64encode(key.encode()).decode()}
    else:
        user = exec_plugin(tmp_path, cert=(cert, key))
    path = write(tmp_path / "config", kubeconfig(tls_api.url, user, ca=tls.ca))
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT / "operator")}
    proc = subprocess.Popen([sys.executable, "-c", LOADER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert len(line) == 3, proc.stderr.read() if proc.stderr else ""
        assert all(p.startswith("/proc/self/fd/") for p in line), line
        assert list(scratch.iterdir()) == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert list(scratch.iterdir()) == []
    assert tls_api.requests()                # it did talk to the API with them
