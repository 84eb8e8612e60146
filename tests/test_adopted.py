"""A worker's adoption of the parent's listening sockets
(:mod:`neurotrale_twisted.process.adopted`).

Each workaround there is checked here with a real socket and a real client: a UNIX socket a
worker stops serving keeps its file, its mode and its listening; an ``ssl:`` socket is served
with the endpoint's own certificate. One test shows why the UNIX workaround is still needed.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThread

from neurotrale_twisted.process.adopted import AdoptedEndpoint, Inherited, SharedSocket, tls_context

from .test_workers import self_signed


class Hello(protocol.Protocol):
    """Says hello and hangs up."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello\n")
        self.transport.loseConnection()


def hello_factory() -> Any:
    return protocol.ServerFactory.forProtocol(Hello)


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """The parent's listening UNIX socket, mode 0660."""
    path = tmp_path / "parent.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    os.chmod(path, 0o660)
    listening.listen(8)
    yield listening, path
    listening.close()


def read_unix(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(path))
        return client.recv(100)


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


@pytest_twisted.ensureDeferred
async def test_a_worker_that_stops_serving_a_unix_socket_leaves_the_parents_alone(
    unix_socket: tuple[socket.socket, Path],
) -> None:
    listening, path = unix_socket
    shared = SharedSocket(os.dup(listening.fileno()), "UNIX")
    endpoint = AdoptedEndpoint(shared, reactor, lambda: True, reactor)
    port = await endpoint.listen(hello_factory())
    assert mode(path) == "0o660"  # not Twisted's 0666
    assert await deferToThread(read_unix, path) == b"hello\n"
    await maybeDeferred(port.stopListening)
    assert path.exists() and mode(path) == "0o660"
    # The parent's socket still listens: a client connects (and waits in its backlog).
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        connection, _ = listening.accept()
        connection.close()


@pytest_twisted.ensureDeferred
async def test_twisteds_own_adoption_of_a_unix_socket_still_changes_and_deletes_it(
    unix_socket: tuple[socket.socket, Path],
) -> None:
    # Why _AdoptedUNIXPort exists. When this fails, Twisted leaves an adopted UNIX socket
    # alone by itself, and adopted.py can use reactor.adoptStreamPort for UNIX sockets too.
    listening, path = unix_socket
    fd = os.dup(listening.fileno())
    os.set_blocking(fd, False)
    port = reactor.adoptStreamPort(fd, socket.AF_UNIX, hello_factory())
    os.close(fd)
    assert mode(path) == "0o666"
    await maybeDeferred(port.stopListening)
    assert not path.exists()


@pytest_twisted.ensureDeferred
async def test_an_adopted_ssl_socket_serves_the_endpoints_own_certificate(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    address = listening.getsockname()
    shared = SharedSocket(os.dup(listening.fileno()), "INET", tls=description)
    port = await AdoptedEndpoint(shared, reactor, lambda: True, reactor).listen(hello_factory())
    listening.close()  # the adopted port holds its own descriptor

    def fetch() -> tuple[bytes, bytes]:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return tls.recv(100), der

    try:
        data, der = await deferToThread(fetch)
    finally:
        await maybeDeferred(port.stopListening)
    assert data == b"hello\n"
    assert ssl.DER_cert_to_PEM_cert(der).strip() == cert.read_text().strip()


def test_tls_context_opens_nothing_and_refuses_what_is_no_ssl_endpoint(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    taken = busy.getsockname()[1]
    try:
        # The port is taken: a context is still made, as nothing listens on it.
        context = tls_context(f"ssl:{taken}:privateKey={key}:certKey={cert}")
        assert context.getContext() is not None
    finally:
        busy.close()
    with pytest.raises(ValueError, match="is not an ssl: endpoint"):
        tls_context("tcp:0")
    with pytest.raises(OSError):
        tls_context(f"ssl:0:privateKey={tmp_path / 'missing.pem'}")


def test_what_a_worker_inherits_travels_as_json() -> None:
    inherited = Inherited(2, (SharedSocket(3, "INET6"), SharedSocket(4, "UNIX", None)))
    assert Inherited.from_json(inherited.to_json()) == inherited
    with pytest.raises(ValueError, match="unknown address family"):
        Inherited.from_json('{"index": 1, "sockets": [{"fd": 3, "family": "PACKET"}]}')
