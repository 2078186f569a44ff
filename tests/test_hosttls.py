"""A host's two TLS contexts, Python's ssl (ocigate's own requests) and pyOpenSSL (mitmproxy's streamed
connections), verify as Go does for containerd, docker and skopeo: the chain to a trusted certificate, and the name.
Each is shown in a real handshake with a local TLS server."""

import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from ocigate.hoststoml import CAPABILITIES, Host
from ocigate.hosttls import HostTLS, HostTLSError, openssl_context, python_context
from tests.support.tls import CA, ServerTLS, issue_server_cert, make_ca, make_openssl_req_ca
from tests.support.within import returns_within

NAME = "mirror.test"


@contextmanager
def tls_server(server: ServerTLS) -> Iterator[int]:
    """Completes (or fails) a TLS handshake with every connection to the port it yields, presenting `server`'s
    certificate alone, without its issuer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert_path, server.key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(5)
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"hello")
            except OSError:
                pass  # the client refused the certificate: that is its verdict, asserted on its side
            finally:
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def python_handshake(tls: HostTLS, port: int) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        python_context(tls).wrap_socket(raw, server_hostname=NAME) as connection,
    ):
        assert connection.recv(5) == b"hello"


def openssl_handshake(tls: HostTLS, port: int) -> None:
    # The name is mitmproxy's to check on this connection (tlsconfig sets it before ocigate swaps the context in);
    # what the context decides is whether the chain is trusted.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.setblocking(True)  # pyOpenSSL wants a blocking socket; the server's own timeout bounds the exchange
        connection = SSL.Connection(openssl_context(tls), raw)
        connection.set_tlsext_host_name(NAME.encode())
        connection.set_connect_state()
        connection.do_handshake()
        assert connection.recv(5) == b"hello"


Handshake = Callable[[HostTLS, int], None]
BOTH_STACKS = pytest.mark.parametrize("handshake", [python_handshake, openssl_handshake], ids=["ssl", "pyopenssl"])
VERIFY_FAILED = (ssl.SSLCertVerificationError, SSL.Error)


@pytest.fixture(scope="module")
def plain_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_openssl_req_ca(tmp_path_factory.mktemp("plain-ca"), "made as openssl req makes it")


def test_the_plain_ca_is_what_strict_verification_refuses(plain_ca: CA, tmp_path: Path) -> None:
    """The control: the CA has no keyUsage, and X.509-strict verification (Python 3.13's default) refuses it."""
    with pytest.raises(x509.ExtensionNotFound):
        plain_ca.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    server = issue_server_cert(plain_ca, tmp_path, [NAME], [])
    strict = ssl.create_default_context(cafile=str(plain_ca.cert_path))
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        tls_server(server) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="key usage"),
    ):
        strict.wrap_socket(raw, server_hostname=NAME)


@BOTH_STACKS
def test_a_ca_without_key_usage_is_trusted(handshake: Handshake, plain_ca: CA, tmp_path: Path) -> None:
    server = issue_server_cert(plain_ca, tmp_path, [NAME], [])
    with tls_server(server) as port:
        handshake(HostTLS(ca=(plain_ca.cert_path,)), port)


@BOTH_STACKS
def test_a_ca_that_did_not_sign_the_certificate_is_refused(handshake: Handshake, plain_ca: CA, tmp_path: Path) -> None:
    other = make_openssl_req_ca(tmp_path / "other", "made as openssl req makes it")  # the same name, another key
    server = issue_server_cert(plain_ca, tmp_path, [NAME], [])
    with tls_server(server) as port, pytest.raises(VERIFY_FAILED, match="certificate verify failed"):
        handshake(HostTLS(ca=(other.cert_path,)), port)


@BOTH_STACKS
def test_an_intermediate_given_as_ca_ends_the_chain(handshake: Handshake, plain_ca: CA, tmp_path: Path) -> None:
    # Go trusts whatever is in its pool; the server sends its own certificate only, and the root is trusted nowhere.
    intermediate = make_ca(tmp_path / "intermediate", "intermediate", issuer=plain_ca)
    server = issue_server_cert(intermediate, tmp_path, [NAME], [])
    with tls_server(server) as port:
        handshake(HostTLS(ca=(intermediate.cert_path,)), port)


@pytest.mark.parametrize(
    ("names", "common_name_only"), [(["other.test"], False), ([NAME], True)], ids=["another-name", "common-name-only"]
)
def test_the_name_must_be_in_the_subject_alternative_names(
    plain_ca: CA, tmp_path: Path, names: list[str], common_name_only: bool
) -> None:
    server = issue_server_cert(plain_ca, tmp_path, names, [], common_name_only=common_name_only)
    with tls_server(server) as port, pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        python_handshake(HostTLS(ca=(plain_ca.cert_path,)), port)


@BOTH_STACKS
def test_skip_verify_still_accepts_any_certificate(handshake: Handshake, tmp_path: Path) -> None:
    server = issue_server_cert(make_ca(tmp_path / "unknown"), tmp_path, ["other.test"], [])
    with tls_server(server) as port:
        handshake(HostTLS(skip_verify=True), port)


@pytest.mark.parametrize("context", [python_context, openssl_context], ids=["ssl", "pyopenssl"])
def test_a_tls_file_that_is_a_fifo_is_an_error_naming_it(context: Callable[[HostTLS], object], tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with pytest.raises(HostTLSError, match=re.escape(f"{fifo}: not a regular file but a FIFO")):
        returns_within(5, lambda: context(HostTLS(ca=(fifo,))))


def test_a_hosts_tls_settings_are_its_ca_client_and_skip_verify() -> None:
    ca, cert, key = Path("/etc/ca.pem"), Path("/etc/client.pem"), Path("/etc/client.key")
    host = Host("https", NAME, 443, "/v2", CAPABILITIES, ca=(ca,), client=((cert, key),), headers=(("X-A", "b"),))
    roots = Path("/etc/roots.pem")
    assert HostTLS.of(host, roots=roots) == HostTLS(ca=(ca,), client=((cert, key),), roots=roots)
    # mitmproxy's ssl_insecure turns verification off for every host, whatever its own settings say.
    assert HostTLS.of(host, insecure=True) == HostTLS(ca=(ca,), client=((cert, key),), skip_verify=True)
