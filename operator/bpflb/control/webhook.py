"""kopf's HTTPS webhook server with a self-signed certificate built by `cryptography`.

kopf's own generator needs certbuilder/oscrypto, and oscrypto 1.3 cannot detect OpenSSL 3.0.1x's version
("Error detecting the version of libcrypto"); everything else (serving, caBundle, cadump, renewal) is
kopf's."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Collection

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class WebhookServer(kopf.WebhookServer):
    """kopf.WebhookServer whose self-signed certificate (a CA for itself) comes from `cryptography`."""

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
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(key, hashes.SHA256()))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode()) if password
            else serialization.NoEncryption())
        pkey = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        return cert.public_bytes(serialization.Encoding.PEM), pkey
