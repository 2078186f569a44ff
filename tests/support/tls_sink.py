"""A TLS listener on loopback that records every byte it is sent: what stands for a registry that must never hear a
client. Unlike the recorder, it records what is not HTTP at all (a raw TCP pipe's bytes). It answers nothing, or one
fixed answer to the first request head of each connection (a 101 that would turn the connection into a pipe)."""

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from .tls import ServerTLS

# How long one connection is read: longer than any test waits for an answer it never gets.
_READ_TIMEOUT = 30.0
_JOIN_TIMEOUT = 5.0
# How often the accept loop looks at its stop flag.
_ACCEPT_POLL = 0.05


@dataclass
class TLSSink:
    port: int
    _received: list[bytes] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def received(self) -> list[bytes]:
        """What each connection sent so far (decrypted), one entry per connection, in the order they came."""
        with self._lock:
            return list(self._received)

    def _add(self) -> int:
        with self._lock:
            self._received.append(b"")
            return len(self._received) - 1

    def _extend(self, index: int, data: bytes) -> None:
        with self._lock:
            self._received[index] += data


@contextlib.contextmanager
def tls_sink(server_tls: ServerTLS, answer: bytes = b"") -> Iterator[TLSSink]:
    """Listens on a free loopback port with `server_tls`'s certificate until the block ends; sends `answer` once a
    connection's first request head is in."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_tls.cert_path, server_tls.key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    sink = TLSSink(listener.getsockname()[1])
    threads: list[threading.Thread] = []
    connections: list[socket.socket] = []

    def read(connection: socket.socket) -> None:
        index = sink._add()
        with contextlib.suppress(OSError), connection:
            connection.settimeout(_READ_TIMEOUT)
            with context.wrap_socket(connection, server_side=True) as tls:
                head = b""
                while data := tls.recv(65536):
                    sink._extend(index, data)
                    if answer and b"\r\n\r\n" not in head:
                        head += data
                        if b"\r\n\r\n" in head:
                            tls.sendall(answer)

    stop = threading.Event()
    listener.settimeout(_ACCEPT_POLL)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(connection)
            thread = threading.Thread(target=read, args=(connection,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield sink
    finally:
        stop.set()
        acceptor.join(timeout=_JOIN_TIMEOUT)
        listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=_JOIN_TIMEOUT)
