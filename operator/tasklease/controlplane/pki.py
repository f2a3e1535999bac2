"""A throwaway PKI for one local control plane.

Every start mints a fresh CA, so nothing trusts a previous run's certificates and nothing
needs rotating. Keys are ECDSA P-256: generating one takes microseconds where RSA-2048 takes
tens of milliseconds, and kube-apiserver, kubectl, client-go and Python's ssl all accept them
(for service-account tokens too: ES256). Validity is a year, backdated an hour for clock skew;
a long `up` session is the longest-lived user.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=365)
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Paths of everything the components and clients need."""

    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    service_account_key: Path  # private, signs tokens (apiserver, controller-manager)
    service_account_pub: Path  # public, verifies tokens (apiserver)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _issue(
    path: Path,
    *,
    subject: x509.Name,
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey | None,
    usage: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    is_ca = ca_cert is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if ca_cert is None else ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    cert = builder.sign(ca_key if ca_key is not None else key, hashes.SHA256())
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(path.with_suffix(".key"), key)
    return cert, key


def create_pki(directory: Path, *, service_ip: str) -> Pki:
    """Write a CA, the apiserver's serving cert, client certs and the service-account key
    pair into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _issue(
        directory / "ca", subject=_name("tasklease-local-ca"), ca_cert=None, ca_key=None, usage=[]
    )
    sans: list[x509.GeneralName] = [
        x509.DNSName(name)
        for name in (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
    ]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(service_ip)),
    ]
    _issue(
        directory / "apiserver",
        subject=_name("kube-apiserver"),
        ca_cert=ca_cert,
        ca_key=ca_key,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=sans,
    )
    # system:masters bypasses authorization entirely (and may impersonate anyone); RBAC's
    # bootstrap policy binds cluster-admin to it as well.
    _issue(
        directory / "admin",
        subject=_name("tasklease-admin", "system:masters"),
        ca_cert=ca_cert,
        ca_key=ca_key,
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _issue(
        directory / "controller-manager",
        subject=_name("system:kube-controller-manager"),
        ca_cert=ca_cert,
        ca_key=ca_key,
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(directory / "service-account.key", sa_key)
    (directory / "service-account.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Pki(
        ca=CertPair(directory / "ca.crt", directory / "ca.key"),
        apiserver=CertPair(directory / "apiserver.crt", directory / "apiserver.key"),
        admin=CertPair(directory / "admin.crt", directory / "admin.key"),
        controller_manager=CertPair(
            directory / "controller-manager.crt", directory / "controller-manager.key"
        ),
        service_account_key=directory / "service-account.key",
        service_account_pub=directory / "service-account.pub",
    )


def issue_client_cert(
    pki: Pki, name: str, *, common_name: str, organization: str | None = None
) -> CertPair:
    """A client certificate signed by the control plane's CA, beside the others: for the
    kubelet (`system:node:<node>` in `system:nodes`), the scheduler, and the API server's
    own client to kubelets."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.ca.key} is not an EC key")
    path = pki.ca.cert.parent / name
    _issue(
        path,
        subject=_name(common_name, organization),
        ca_cert=ca_cert,
        ca_key=ca_key,
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return CertPair(path.with_suffix(".crt"), path.with_suffix(".key"))
