"""Connection floods against real ``twistd neurotrale`` processes on loopback.

Each server starts with a low open-file limit (soft 128, hard 256, set before it execs), so
that a few hundred idle connections are a flood. What a user must see: the soft limit raised
to the hard one; at ``--max-connections`` a new connection closed at once while the open ones
are served; the flood's silent connections closed at ``--header-timeout`` (not at the
keep-alive ``--idle-timeout``), after which new clients get in; and a log that says so a
bounded number of times, never once per refusal.
"""

from __future__ import annotations

import http.client
import re
import resource
import selectors
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import pytest

from neurotrale_twisted.web.connections import default_max_connections

from .test_e2e import Twistd
from .test_workers import children_of, self_signed, wait_for, worker_pid

SOFT, HARD = 128, 256
CHUNK = "/demo-brain/1_1_1/0-64_0-64_0-32"
CHUNK_BYTES = 64 * 64 * 32 * 2
CAP = 40
FLOOD = 100
HEADER_TIMEOUT = 5


def low_fd_limit() -> None:
    """Run in the server's process before it execs: a low open-file limit to start with."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


def open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard "Max open files" of process ``pid``, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def connect_many(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to the server that send nothing."""
    return [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(count)]


def closed_by_server(socks: Iterable[socket.socket], within: float) -> set[socket.socket]:
    """The sockets the server closed within ``within`` seconds, having sent nothing on them."""
    pending = set(socks)
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        for sock in pending:
            selector.register(sock, selectors.EVENT_READ)
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = cast(socket.socket, key.fileobj)
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"the server answered a silent connection: {data!r}"
                selector.unregister(sock)
                pending.discard(sock)
                closed.add(sock)
    return closed


def get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    """A GET on an open keep-alive connection."""
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def counts(pattern: str, text: str) -> list[int]:
    """The number each log line matching ``pattern`` (one group) reports."""
    return [int(n) for n in re.findall(pattern, text)]


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Client sockets the test opened, all closed at its end."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_an_idle_flood_past_the_cap_locks_no_client_out(
    demo_root: Path, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    log = tmp_path / "server.log"
    server = Twistd(
        demo_root,
        log,
        "--max-connections",
        str(CAP),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--threads",
        "2",
        preexec_fn=low_fd_limit,
    )
    port = int(server.url.rsplit(":", 1)[1])
    try:
        # A client already connected, between two requests on its keep-alive connection.
        busy = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert get(busy, "/healthz")[0] == 200
        flooded = time.monotonic()
        sockets.extend(connect_many(port, FLOOD))
        assert time.monotonic() - flooded < HEADER_TIMEOUT - 2, "too slow a flood for this test"
        refused = closed_by_server(sockets, 1)
        held = [s for s in sockets if s not in refused]
        # The cap counts the busy client (and, for a moment, the start-up probe's connection).
        assert CAP - 2 <= len(held) <= CAP - 1, len(held)
        # At the cap the open client is served, from a file the decoder opens...
        status, body = get(busy, CHUNK)
        assert (status, len(body)) == (200, CHUNK_BYTES)
        # ...and a new one is closed at once.
        probe = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(probe)
        assert closed_by_server([probe], 2) == {probe}
        # The flood sent no request: it is closed at the header timeout, not the idle one (60 s).
        assert closed_by_server(held, HEADER_TIMEOUT + 6) == set(held)
        took = time.monotonic() - flooded
        assert HEADER_TIMEOUT - 0.5 < took < HEADER_TIMEOUT + 6, took
        with urllib.request.urlopen(server.url + CHUNK, timeout=10) as answer:
            assert (answer.status, len(answer.read())) == (200, CHUNK_BYTES)
        # The client between requests was idle all along, and is still served.
        assert get(busy, "/healthz")[0] == 200
        busy.close()
    finally:
        server.stop()
    text = log.read_text()
    refusals = counts(r"refused (\d+) new connection\(s\)", text)
    # At most one line per 10 s (the first at once, the rest when the server stopped),
    # together counting every refusal.
    assert 1 <= len(refusals) <= 2, refusals
    assert sum(refusals) == len(refused) + 1
    slow = counts(r"closed (\d+) connection\(s\) that sent no complete", text)
    assert 1 <= len(slow) <= 2 and sum(slow) == len(held), slow
    assert "EMFILE" not in text and "Could not accept" not in text
    assert "Timing out client" not in text


def keep_alive_to_every_process(
    port: int, pids: set[int], tries: int = 200
) -> dict[int, http.client.HTTPConnection]:
    """A keep-alive connection served by each process of ``pids`` (each answer names its pid)."""
    found: dict[int, http.client.HTTPConnection] = {}
    for _ in range(tries):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        pid = worker_pid(response.headers)
        if pid in found:
            connection.close()
        else:
            found[pid] = connection
        if set(found) == pids:
            break
    return found


def test_the_soft_limit_is_raised_and_silent_connections_close_at_the_header_timeout(
    demo_root: Path, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    log = tmp_path / "server.log"
    server = Twistd(
        demo_root,
        log,
        "--header-timeout",
        "2",
        "--idle-timeout",
        "60",
        workers=2,
        preexec_fn=low_fd_limit,
    )
    port = int(server.url.rsplit(":", 1)[1])
    try:
        pids = {server.process.pid, *wait_for(lambda: children_of(server.process.pid), 10, "")}
        assert len(pids) == 2
        for pid in pids:
            assert open_files_limit(pid) == (HARD, HARD), pid
        # One keep-alive connection to each process, between two requests.
        keep_alive = keep_alive_to_every_process(port, pids)
        assert set(keep_alive) == pids
        started = time.monotonic()
        sockets.extend(connect_many(port, 8))
        assert closed_by_server(sockets, 10) == set(sockets)
        took = time.monotonic() - started
        assert 1.5 < took < 6, took
        # A keep-alive connection between requests waits for the idle timeout, not this one;
        # a request begun on it has the header timeout, in the worker process too.
        for pid, connection in keep_alive.items():
            status, body = get(connection, CHUNK)
            assert (status, len(body)) == (200, CHUNK_BYTES)
            sock = connection.sock
            assert sock is not None
            begun = time.monotonic()
            sock.sendall(b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            while data := sock.recv(65536):
                answer += data
            assert 1.5 < time.monotonic() - begun < 6, pid
            assert answer.startswith(b"HTTP/1.1 408"), pid
            assert b"request line and headers did not arrive within 2 seconds" in answer
            connection.close()
    finally:
        server.stop()
    text = log.read_text()
    # The limit is logged once (a worker inherits it raised and says nothing).
    assert len(re.findall(r"open files: 256 per process \(the soft limit was 128", text)) == 1
    assert "Timing out client" not in text


def test_out_of_descriptors_the_refusals_are_logged_once_per_interval(
    demo_root: Path, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    log = tmp_path / "server.log"
    # A cap over what the limit allows: the process runs out of descriptors first. (The
    # header timeout is long: only the accept failures close connections here.)
    server = Twistd(
        demo_root,
        log,
        "--max-connections",
        "1000",
        "--header-timeout",
        "60",
        preexec_fn=low_fd_limit,
    )
    try:
        port = int(server.url.rsplit(":", 1)[1])
        sockets.extend(connect_many(port, HARD + 60))
        refused = closed_by_server(sockets, 1)
        assert refused, "the process had descriptors for every connection"
        for sock in sockets:
            sock.close()
        # Once the flood is gone, clients get in.
        with urllib.request.urlopen(server.url + CHUNK, timeout=10) as answer:
            assert (answer.status, len(answer.read())) == (200, CHUNK_BYTES)
    finally:
        server.stop()
    text = log.read_text()
    assert len(re.findall(r"--max-connections 1000 leaves fewer than", text)) == 1
    failures = counts(r"could not accept (\d+) new connection\(s\) \(EMFILE", text)
    assert 1 <= len(failures) <= 2 and sum(failures) == len(refused), failures
    # Twisted's own lines, two or three per refused connection, are not in the log.
    assert "EMFILE recovery" not in text and "EMFILE encountered" not in text


def test_the_cap_closes_connections_before_tls_and_the_tls_clients_are_served(
    demo_root: Path, tmp_path: Path, sockets: list[socket.socket]
) -> None:
    key, certificate = self_signed(tmp_path)
    log = tmp_path / "server.log"
    server = Twistd(
        demo_root,
        log,
        "--listen",
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}",
        "--max-connections",
        "4",
        "--header-timeout",
        str(HEADER_TIMEOUT),
    )
    match = re.search(r"NeurotraleSite \(TLS\) starting on (\d+)", log.read_text())
    assert match
    port = int(match.group(1))
    context = ssl.create_default_context(cafile=str(certificate))
    context.check_hostname = False  # the certificate names 127.0.0.1 as its CN only
    try:
        busy = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        assert get(busy, "/healthz")[0] == 200
        flooded = time.monotonic()
        # Plain TCP connections that never begin the TLS handshake.
        sockets.extend(connect_many(port, 10))
        assert time.monotonic() - flooded < HEADER_TIMEOUT - 2, "too slow a flood for this test"
        refused = closed_by_server(sockets, 1)
        assert 2 <= len(sockets) - len(refused) <= 3
        status, body = get(busy, CHUNK)
        assert (status, len(body)) == (200, CHUNK_BYTES)
        held = [s for s in sockets if s not in refused]
        assert closed_by_server(held, HEADER_TIMEOUT + 6) == set(held)
        fresh = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        assert get(fresh, "/healthz")[0] == 200
        fresh.close()
        busy.close()
    finally:
        server.stop()
    text = log.read_text()
    refusals = counts(r"refused (\d+) new connection\(s\)", text)
    assert 1 <= len(refusals) <= 2 and sum(refusals) == len(refused), refusals
    assert "Traceback" not in text


def test_the_default_cap_keeps_a_reserve_of_descriptors_for_files() -> None:
    # 64, and 8 per thread, 4 per worker process.
    assert default_max_connections(1024, threads=6, workers=10) == 1024 - (64 + 48 + 40)
    # A high limit: at most 16384, the memory a flood of idle connections may take.
    assert default_max_connections(524288, threads=32, workers=10) == 16384
    # A limit too low for the reserve: half of it.
    assert default_max_connections(100, threads=6, workers=1) == 50
