"""Throwaway PKI for tests: a CA, server certificates with DNS and IP SANs, and client certificates.

Everything is generated with `cryptography` (it comes with mitmproxy) and written as PEM files, because
the consumers are other processes (docker-registry, skopeo, mitmproxy) that read certificates from disk.
Keys are EC P-256: quick to generate and accepted by Go, OpenSSL and Python alike; only the CA made as `openssl req`
makes one has an RSA key.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Backdated so that a clock a little behind the one that signed does not see "not yet valid".
_BACKDATE = datetime.timedelta(hours=1)
_VALIDITY = datetime.timedelta(days=7)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CA:
    cert_path: Path
    key_path: Path
    # Kept in memory so that issuing does not have to parse the PEM files again.
    certificate: x509.Certificate = field(repr=False)
    private_key: PrivateKey = field(repr=False)


@dataclass(frozen=True)
class ServerTLS:
    cert_path: Path
    key_path: Path
    ca_path: Path


def _write_key(path: Path, key: PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "cert"


def make_ca(directory: Path, common_name: str = "ocigate test CA", *, issuer: CA | None = None) -> CA:
    """Create a CA as ca.pem / ca-key.pem in `directory`: self-signed, or an intermediate CA of `issuer` (which
    must allow one: make_ca's do not, make_openssl_req_ca's do)."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer = issuer.private_key if issuer else key
    builder = (
        _ca_builder(common_name, key, issuer.certificate.subject if issuer else None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Python >= 3.13 verifies with VERIFY_X509_STRICT, which insists on key identifiers.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()), critical=False
        )
    return _save_ca(directory, builder.sign(signer, hashes.SHA256()), key)


def make_openssl_req_ca(directory: Path, common_name: str) -> CA:
    """The CA that `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=<common_name>` makes with OpenSSL 3's
    default configuration, the common way to make one: an RSA key, a critical basicConstraints CA:TRUE without a
    path length, subject and authority key identifiers, and no keyUsage extension (Go accepts it; Python 3.13's
    default context does not)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = (
        _ca_builder(common_name, key, None)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _save_ca(directory, certificate, key)


def _ca_builder(common_name: str, key: PrivateKey, issuer: x509.Name | None) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
    )


def _save_ca(directory: Path, certificate: x509.Certificate, key: PrivateKey) -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "ca.pem"
    key_path = directory / "ca-key.pem"
    _write_cert(cert_path, certificate)
    _write_key(key_path, key)
    return CA(cert_path=cert_path, key_path=key_path, certificate=certificate, private_key=key)


def _issue(
    ca: CA,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.private_key, hashes.SHA256()), key


def issue_server_cert(
    ca: CA,
    directory: Path,
    names: list[str],
    ips: list[str],
    *,
    stem: str | None = None,
    common_name_only: bool = False,
) -> ServerTLS:
    """Issue a server certificate whose SANs are `names` (DNS) and `ips` (IP addresses); with `common_name_only`,
    the first of them is the subject's common name and there are no SANs, as before SANs were used for hosts.

    Files are <stem>.pem / <stem>-key.pem; the stem defaults to the first name or IP, so several
    certificates can share a directory.
    """
    if not names and not ips:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    directory.mkdir(parents=True, exist_ok=True)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    common_name = (names or ips)[0]
    cert, key = _issue(ca, common_name, [] if common_name_only else sans, ExtendedKeyUsageOID.SERVER_AUTH)
    stem = _safe_stem(stem or f"server-{common_name}")
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}-key.pem"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return ServerTLS(cert_path=cert_path, key_path=key_path, ca_path=ca.cert_path)


def issue_client_cert(ca: CA, directory: Path, cn: str) -> tuple[Path, Path]:
    """Issue a client-auth certificate with common name `cn`; returns (cert_path, key_path)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = _issue(ca, cn, [], ExtendedKeyUsageOID.CLIENT_AUTH)
    stem = _safe_stem(f"client-{cn}")
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}-key.pem"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def client_ssl_context(ca_path: Path, client_cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """An SSL context trusting only `ca_path`, optionally presenting a client certificate.

    httpx 0.28 deprecates verify=<path> and cert=...; pass this as verify= instead.
    """
    context = ssl.create_default_context(cafile=str(ca_path))
    # As the Go clients verify, not to the letter of RFC 5280 as Python 3.13's default context does: a CA made with
    # `openssl req -x509` has no keyUsage extension (make_openssl_req_ca).
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if client_cert is not None:
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    return context
