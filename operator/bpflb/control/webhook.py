"""The admission webhook's HTTPS server: kopf's WebhookServer with a self-signed certificate built by
`cryptography`, and the publication of its CA bundle into the ValidatingWebhookConfiguration the Helm chart
installs.

kopf's own generator needs certbuilder/oscrypto, and oscrypto 1.3 cannot detect OpenSSL 3.0.1x's version
("Error detecting the version of libcrypto"); everything else (serving, cadump, reloading certificate files)
is kopf's.

The chart owns the ValidatingWebhookConfiguration (rules, service reference, failure policy); the operator
only fills in `clientConfig.caBundle` of its webhooks (publish_ca_bundle). kopf's own "managed" mode would
rewrite every webhook entry, which a GitOps tool would then report as drift. The certificate is made when
the operator starts and the bundle is published before the server listens, so a listening webhook port (the
chart's readiness probe) means the API server can verify it."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import ipaddress
import logging
import os
import tempfile
from collections.abc import AsyncGenerator, Callable, Collection
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bpflb.kubeapi import ApiError, KubeClient, resource_path

log = logging.getLogger("bpflb.webhook")

CERT_VALIDITY = datetime.timedelta(days=365)
ROTATE_BEFORE = datetime.timedelta(days=30)   # a generated certificate is replaced this long before its end
REPUBLISH_INTERVAL = 60.0      # seconds between two checks that the published CA bundle is still in place


def webhook_configuration_path(name: str) -> str:
    return resource_path("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", None, name)


def publish_ca_bundle(client: KubeClient, name: str, cadata: bytes) -> int:
    """Set clientConfig.caBundle of every webhook of the ValidatingWebhookConfiguration `name` to cadata,
    leaving everything else as it is. Returns how many webhooks changed (0: already in place).

    The patch carries the resourceVersion it was computed from, so a concurrent change of the object (a Helm
    upgrade, an Argo CD sync) makes it fail with 409 instead of being overwritten; the caller retries."""
    path = webhook_configuration_path(name)
    live = client.get(path)
    if live is None:
        raise ApiError(404, "GET", path, f"ValidatingWebhookConfiguration {name} does not exist (the Helm "
                       "chart creates it; the CA bundle is published into it)")
    bundle = base64.b64encode(cadata).decode("ascii")
    hooks = live.get("webhooks") or []
    stale = [h for h in hooks if (h.get("clientConfig") or {}).get("caBundle") != bundle]
    if not stale:
        return 0
    patched = copy.deepcopy(hooks)
    for hook in patched:
        hook.setdefault("clientConfig", {})["caBundle"] = bundle
    client.merge_patch(path, {"metadata": {"resourceVersion": (live.get("metadata") or {}).get("resourceVersion")},
                              "webhooks": patched})
    return len(stale)


class WebhookServer(kopf.WebhookServer):
    """kopf.WebhookServer whose self-signed certificate (a CA for itself) comes from `cryptography`, and
    which, given `publish`, hands its CA bundle to it before listening and every REPUBLISH_INTERVAL after."""

    def __init__(self, *, publish: Callable[[bytes], int] | None = None,
                 republish_interval: float = REPUBLISH_INTERVAL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.publish = publish
        self.republish_interval = republish_interval
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._generated: bytes | None = None      # the self-signed certificate made here, if any

    @staticmethod
    def build_certificate(hostnames: Collection[str], password: str | None = None) -> tuple[bytes, bytes]:
        names: list[x509.GeneralName] = []
        common = None
        for host in hostnames:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                names.append(x509.DNSName(host))
                common = common or host
                continue
            if not ip.is_unspecified:
                names.append(x509.IPAddress(ip))
                common = common or str(ip)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common or "bpflb-webhook")])
        now = datetime.datetime.now(tz=datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + CERT_VALIDITY)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(key, hashes.SHA256()))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode()) if password
            else serialization.NoEncryption())
        pkey = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        return cert.public_bytes(serialization.Encoding.PEM), pkey

    def _generate(self) -> bytes:
        """Write a new self-signed pair into the server's private directory; return the certificate."""
        host = self.host or self.DEFAULT_HOST
        addr = self._get_accessible_addr(self.addr)
        certdata, pkeydata = self.build_certificate([host or addr, addr, *self.extra_sans], self.password)
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="bpflb-webhook-")
        directory = Path(self._tmpdir.name)
        # Write beside, then rename: kopf's file watcher must never read half a pair.
        for name, data, mode in (("tls.key", pkeydata, 0o600), ("tls.crt", certdata, 0o644)):
            fd = os.open(directory / f".{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(directory / f".{name}", directory / name)
        self.certfile, self.pkeyfile = str(directory / "tls.crt"), str(directory / "tls.key")
        self._generated = certdata
        return certdata

    def _certificate_files(self) -> bytes:
        """Make sure the server has certificate files (a self-signed pair in a private temporary directory
        when none were given) and return the CA bundle clients verify it with."""
        if self.certfile is None or self.pkeyfile is None:
            return self._generate()
        if self.cadata is not None:
            return self.cadata
        return Path(self.cafile or self.certfile).read_bytes()

    def _rotate_if_due(self, cadata: bytes, now: datetime.datetime | None = None) -> tuple[bytes, bytes] | None:
        """A generated certificate within ROTATE_BEFORE of its end is replaced. Returns (the bundle to publish
        while kopf reloads: old and new, the bundle to publish after), or None when nothing is due."""
        if self._generated is None:
            return None
        end = x509.load_pem_x509_certificate(self._generated).not_valid_after_utc
        if (now or datetime.datetime.now(tz=datetime.UTC)) < end - ROTATE_BEFORE:
            return None
        new = self._generate()
        log.info("the webhook's certificate ends %s: replaced it with a new one", end.isoformat())
        return cadata + new, new

    async def _publish(self, cadata: bytes, *, until_done: bool) -> None:
        assert self.publish is not None
        delay = 0.5
        while True:
            try:
                changed = await asyncio.to_thread(self.publish, cadata)
            except (ApiError, OSError) as exc:
                log.warning("cannot publish the webhook's CA bundle: %s; retrying in %.0fs", exc, delay)
            else:
                if changed:
                    log.info("published the webhook's CA bundle into %d webhook(s)", changed)
                return
            if not until_done:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _keep_published(self, cadata: bytes) -> None:
        """Put the CA bundle back if something removed it; rotate a generated certificate before it ends
        (the bundle holds the old and the new certificate until kopf has reloaded the new files)."""
        while True:
            await asyncio.sleep(self.republish_interval)
            rotated = self._rotate_if_due(cadata)
            if rotated is not None:
                both, cadata = rotated
                await self._publish(both, until_done=True)
                await asyncio.sleep(self.file_check_interval * 2 + 1)
                await self._publish(cadata, until_done=True)
                continue
            await self._publish(cadata, until_done=False)

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncGenerator[kopf.WebhookClientConfig, None]:
        if self.publish is None:
            async for config in super().__call__(fn):
                yield config
            return
        cadata = await asyncio.to_thread(self._certificate_files)
        await self._publish(cadata, until_done=True)
        keeper = asyncio.get_running_loop().create_task(self._keep_published(cadata))
        try:
            async for config in super().__call__(fn):
                yield config
        finally:
            keeper.cancel()
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
