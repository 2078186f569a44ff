"""A host's TLS settings from hosts.toml (`ca`, `client`, `skip_verify`) as contexts for both HTTP stacks.

ocigate's own requests use Python's ssl (wire.py, on asyncio's streams); the streamed blob connections mitmproxy
opens use pyOpenSSL. Both must trust and present exactly the same things for a host, so both contexts are built here
from one key.

Both verify as Go does for containerd, docker and skopeo: a chain to a trusted certificate, and the name. Not the
fine print of RFC 5280 that Python 3.13's default context insists on (VERIFY_X509_STRICT refuses a CA without a
keyUsage extension, which is what `openssl req -x509` makes); and a trusted certificate ends the chain even when it
is an intermediate (Go's root pool; OpenSSL's PARTIAL_CHAIN, which only Python 3.13 sets by itself).
"""

import os
import ssl
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import certifi
from OpenSSL import SSL, crypto

from .files import NotRegularFileError, check_regular
from .hoststoml import Host, TLSSettings


@dataclass(frozen=True)
class HostTLS(TLSSettings):
    """A host's TLS settings, and the roots every host is verified with: what both contexts are built from."""

    # Replaces the default roots (the system store and certifi) for every host: mitmproxy's
    # ssl_verify_upstream_trusted_ca, so that both stacks honour it.
    roots: Path | None = None

    @classmethod
    def of(cls, host: Host, *, roots: Path | None = None, insecure: bool = False) -> "HostTLS":
        """`insecure` is mitmproxy's ssl_insecure: it turns verification off for every host, as it does for
        mitmproxy's own connections."""
        settings = replace(host.tls, skip_verify=True) if insecure else host.tls
        return cls(**vars(settings), roots=roots)


class HostTLSError(Exception):
    """A `ca` or `client` file of a host that cannot be loaded; the message names the file."""


@cache
def python_context(tls: HostTLS) -> ssl.SSLContext:
    _check_regular_files(tls)
    try:
        if tls.roots:
            context = ssl.create_default_context(cafile=str(tls.roots))
        else:
            # containerd trusts the system store; certifi is what mitmproxy trusts: a host either accepts is valid.
            context = ssl.create_default_context()
            context.load_verify_locations(cafile=certifi.where())
        # Like containerd, a host's `ca` adds to the roots rather than replacing them.
        for ca in tls.ca:
            context.load_verify_locations(cafile=str(ca))
        for cert, key in tls.client:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as e:
        raise HostTLSError(f"cannot load TLS files {_files(tls)}: {e}") from None
    context.verify_flags = (context.verify_flags & ~ssl.VERIFY_X509_STRICT) | ssl.VERIFY_X509_PARTIAL_CHAIN
    # Go never takes the subject's common name for a host name, nor does mitmproxy's connection.
    context.hostname_checks_common_name = False
    if tls.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@cache
def openssl_context(tls: HostTLS) -> SSL.Context:
    _check_regular_files(tls)
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    try:
        if tls.roots:
            context.load_verify_locations(str(tls.roots))
        else:
            context.set_default_verify_paths()
            context.load_verify_locations(certifi.where())
        for ca in tls.ca:
            context.load_verify_locations(str(ca))
        for cert, key in tls.client:
            context.use_certificate_chain_file(str(cert))
            context.use_privatekey_file(str(key or cert))
    except SSL.Error as e:
        raise HostTLSError(f"cannot load TLS files {_files(tls)}: {e}") from None
    # OpenSSL's own default is not strict; the store's flags reach the connection that mitmproxy set a name on.
    store = context.get_cert_store()
    assert store is not None  # OpenSSL gives every context a store of its own
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    context.set_verify(SSL.VERIFY_NONE if tls.skip_verify else SSL.VERIFY_PEER, None)
    return context


def forget_contexts() -> None:
    """Rules were reloaded: a `ca` or `client` file may have changed on disk."""
    python_context.cache_clear()
    openssl_context.cache_clear()


def _paths(tls: HostTLS) -> list[Path]:
    return [*tls.ca, *(p for pair in tls.client for p in pair if p)]


def _files(tls: HostTLS) -> str:
    return ", ".join(str(p) for p in _paths(tls))


def _check_regular_files(tls: HostTLS) -> None:
    """ssl and OpenSSL open the files by name, and rules are loaded on the event loop: a FIFO among them would stop
    every flow."""
    for path in _paths(tls):
        try:
            check_regular(os.stat(path).st_mode)
        except NotRegularFileError as e:
            raise HostTLSError(f"cannot load TLS file {path}: {e}") from None
        except OSError:
            pass  # loading it says what is wrong, as for every other file
