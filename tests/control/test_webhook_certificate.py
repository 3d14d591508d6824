"""The webhook server's certificate life cycle, without an API: the CA bundle is handed to the publisher
before the port listens, handed again periodically (so a removed caBundle comes back), and a generated
certificate near its end is replaced by a new one, published first together with the old one."""

from __future__ import annotations

import asyncio
import datetime
import socket
from pathlib import Path
from typing import Any

from cryptography import x509

from bpflb.control.webhook import CERT_VALIDITY, ROTATE_BEFORE, WebhookServer
from tests.control.helpers import free_port


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _fn(*_args: Any, **_kwargs: Any) -> Any:
    return {}


def test_published_before_listening_then_again_periodically() -> None:
    port = free_port()
    published: list[tuple[bytes, bool]] = []

    def publish(cadata: bytes) -> int:
        published.append((cadata, listening(port)))
        return 1

    server = WebhookServer(addr="127.0.0.1", port=port, host="bpflb-operator.kube-system.svc", publish=publish,
                           republish_interval=0.05)

    async def run() -> None:
        configs = server(_fn)
        config = await configs.__anext__()
        assert listening(port)
        for _ in range(400):                  # republished (every 0.05 s) at least twice more: a condition
            if len(published) >= 3:
                break
            await asyncio.sleep(0.01)
        await configs.aclose()
        assert config["caBundle"]

    asyncio.run(run())
    assert published[0][1] is False, "the CA bundle must be in place before the port listens"
    assert len(published) >= 3 and len({ca for ca, _ in published}) == 1
    cert = x509.load_pem_x509_certificate(published[0][0])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["bpflb-operator.kube-system.svc"]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(life - CERT_VALIDITY - datetime.timedelta(minutes=5)) < datetime.timedelta(seconds=5)


def test_a_generated_certificate_is_replaced_before_it_ends() -> None:
    server = WebhookServer(addr="127.0.0.1", port=free_port(), host="bpflb-operator.kube-system.svc")
    old = server._certificate_files()
    assert server._rotate_if_due(old) is None
    end = x509.load_pem_x509_certificate(old).not_valid_after_utc
    rotated = server._rotate_if_due(old, now=end - ROTATE_BEFORE + datetime.timedelta(seconds=1))
    assert rotated is not None
    both, new = rotated
    assert new != old and both == old + new
    assert Path(str(server.certfile)).read_bytes() == new
    x509.load_pem_x509_certificates(both)      # a valid bundle of two


def test_a_given_certificate_is_never_rotated(tmp_path: Any) -> None:
    cert, key = WebhookServer.build_certificate(["bpflb-operator.kube-system.svc"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    server = WebhookServer(port=free_port(), certfile=str(tmp_path / "tls.crt"), pkeyfile=str(tmp_path / "tls.key"))
    assert server._certificate_files() == cert
    far = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(days=3650)
    assert server._rotate_if_due(cert, now=far) is None
