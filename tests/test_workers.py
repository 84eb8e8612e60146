"""``--workers N`` end to end: real ``twistd neurotrale`` processes, counted in the process table.

Every process must answer (told apart by ``X-Neurotrale-Worker`` and by pid), a killed worker
is replaced, SIGTERM stops them all after the answers in flight are sent, SIGKILL of the
parent leaves no orphan, and annotation writes from every process serialise on one file.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.multihost_setup import alive, children_of

from .support import write_chunk, write_info
from .test_e2e import Twistd

CHUNK = "/demo-brain/1_1_1/0-64_0-64_0-32"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def get(url: str, data: bytes | None = None, method: str = "GET") -> tuple[int, Any, bytes]:
    """One request on a fresh connection: status, headers, body."""
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def worker_pid(headers: Any) -> int:
    match = re.fullmatch(r"(\d+); pid=(\d+)", headers["X-Neurotrale-Worker"])
    assert match, headers["X-Neurotrale-Worker"]
    return int(match.group(2))


def pids_answering(fetch: Callable[[], Any], want: Iterable[int], tries: int = 400) -> set[int]:
    """Ask concurrently until every pid of ``want`` answered (or ``tries`` requests were made)."""
    wanted = set(want)
    seen: set[int] = set()
    with ThreadPoolExecutor(12) as pool:
        for _ in range(tries // 20):
            for headers in pool.map(lambda _: fetch(), range(20)):
                seen.add(worker_pid(headers))
            if wanted <= seen:
                break
    return seen


@pytest.fixture
def start() -> Iterator[Callable[..., Twistd]]:
    """Start ``twistd neurotrale`` processes; afterwards, none of them is left running."""
    started: list[tuple[Twistd, set[int]]] = []

    def run(root: Path, log: Path, *args: str, workers: int, cwd: Path | None = None) -> Twistd:
        server = Twistd(root, log, *args, workers=workers, cwd=cwd)
        started.append((server, children_of(server.process.pid)))
        return server

    yield run
    for server, children in started:
        children |= children_of(server.process.pid)
        try:
            server.stop()
        finally:
            for pid in children:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def metric(text: str, name: str) -> float:
    """The value of one sample in the Prometheus text ``text``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in:\n{text}")


def test_every_worker_serves_and_a_killed_one_is_replaced(
    start: Callable[..., Twistd], demo_root: Path, tmp_path: Path
) -> None:
    server = start(demo_root, tmp_path / "server.log", workers=3)
    try:
        parent = server.process.pid
        children = children_of(parent)
        assert len(children) == 2
        asked = []

        def fetch() -> Any:
            asked.append(1)
            return get(server.url + CHUNK)[1]

        seen = pids_answering(fetch, {parent, *children})
        assert seen == {parent, *children}

        status, _, body = get(server.url + "/metrics")
        assert status == 200
        served = metric(
            body.decode(),
            'neurotrale_http_requests_total{method="GET",route="chunk",status="200"}',
        )
        assert served == len(asked)  # every process's requests, summed

        # A worker's access-log lines reach the log within a tenth of a second, batched.
        def logged(pid: int) -> Callable[[], Any]:
            line = rf"\[worker-\d:{pid} [^]]*\] \"127\.0\.0\.1\" - - \["
            return lambda: re.search(line, server.log.read_text())

        for pid in children:
            wait_for(logged(pid), 2, f"worker {pid}'s access-log lines")

        victim = min(children)
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(lambda: children_of(parent) - children, 20, "a new worker")
        (newcomer,) = replaced
        wait_for(
            lambda: re.search(
                r"worker \d serving on", server.log.read_text().split(str(victim))[-1]
            ),
            20,
            "the new worker to serve",
        )
        print(
            f"worker pid {victim} killed, pid {newcomer} serving "
            f"{time.monotonic() - started:.1f} s later"
        )
        assert children_of(parent) == (children - {victim}) | {newcomer}
        assert newcomer in pids_answering(lambda: get(server.url + CHUNK)[1], {newcomer})
        metrics = get(server.url + "/metrics")[2].decode()
        assert metric(metrics, "neurotrale_worker_restarts_total") == 1
        assert f"(pid {victim}) exited" in server.log.read_text()
    finally:
        server.stop()


def big_dataset(root: Path) -> int:
    """A dataset with one 32 MiB chunk, more than the socket buffers hold. Returns its size."""
    dataset = root / "big"
    write_info(dataset, (1024, 1024, 16), chunk=(1024, 1024, 16))
    volume = np.arange(16 * 1024 * 1024, dtype="uint16").reshape(16, 1024, 1024)
    write_chunk(dataset, "1_1_1", (0, 1024, 0, 1024, 0, 16), volume)
    return volume.nbytes


def test_sigterm_sends_the_answers_in_flight_then_stops_every_process(
    start: Callable[..., Twistd], tmp_path: Path
) -> None:
    root = tmp_path / "data"
    size = big_dataset(root)
    server = start(root, tmp_path / "server.log", workers=2)
    parent = server.process.pid
    children = children_of(parent)
    assert len(children) == 1
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/big/1_1_1/0-1024_0-1024_0-16")
    answer = connection.getresponse()  # the headers are here; most of the body is not
    assert answer.status == 200
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    body = answer.read()
    assert len(body) == size  # the answer was sent whole
    assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)
    wait_for(lambda: not any(alive(pid) for pid in children), 15, "the workers to exit")
    stopped = time.monotonic() - started
    print(f"SIGTERM: parent and its worker gone {stopped:.2f} s later, 32 MiB answer complete")
    assert stopped < 10
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2)
    # The answer sent while the processes stopped is in the access log.
    assert re.search(
        r'"GET /big/1_1_1/0-1024_0-1024_0-16 HTTP/1\.1" 200 ', server.log.read_text()
    ), server.log.read_text()[-3000:]


def test_sigkill_of_the_parent_leaves_no_orphan_and_unix_sockets_are_shared(
    start: Callable[..., Twistd], demo_root: Path, tmp_path: Path
) -> None:
    path = tmp_path / "neurotrale.sock"
    server = start(demo_root, tmp_path / "server.log", f"--listen=unix:{path}:mode=660", workers=2)
    parent = server.process.pid
    children = children_of(parent)

    def over_unix() -> Any:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"GET /demo-brain/info HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.0 200"), head
        return dict(line.split(": ", 1) for line in head.splitlines()[1:])

    assert pids_answering(over_unix, {parent, *children}) == {parent, *children}
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    # A worker that stops leaves the parent's socket file in place.
    victim = min(children)
    os.kill(victim, signal.SIGTERM)
    wait_for(lambda: not alive(victim), 15, "the worker to exit")
    assert path.exists()
    over_unix()

    everyone = children_of(parent) | {parent}
    started = time.monotonic()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=5)
    wait_for(lambda: not any(alive(pid) for pid in everyone), 15, "the orphans to exit")
    print(
        f"SIGKILL of the parent: all {len(everyone)} processes gone "
        f"{time.monotonic() - started:.2f} s later"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2)


def test_concurrent_patches_from_every_worker_lose_nothing(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    server = start(data_root, tmp_path / "server.log", workers=3)
    try:
        url = server.url + "/demo-brain/annotations/x0y0z0/busy.json"

        def patch(i: int) -> tuple[int, Any, bytes]:
            record = {"point": [i, 2, 3], "type": "point", "id": f"r{i}", "anntype": "neuron"}
            return get(f"{url}?id=r{i}", json.dumps(record).encode(), "PATCH")

        with ThreadPoolExecutor(24) as pool:
            writes = [pool.submit(patch, i) for i in range(150)]
            reads = [pool.submit(get, url) for _ in range(75)]
            written = [w.result() for w in writes]
            read = [r.result() for r in reads]
        assert [status for status, _, _ in written] == [200] * 150
        parsed = 0
        for status, _, body in read:
            if status == 200:
                assert isinstance(json.loads(body), list)  # never torn
                parsed += 1
            else:
                assert status == 404  # before the first write
        writers = {worker_pid(headers) for _, headers, _ in written}
        final = json.loads(get(url)[2])
        assert sorted(r["id"] for r in final) == sorted(f"r{i}" for i in range(150))
        print(
            f"--workers 3: 150 PATCHes from {len(writers)} processes, {len(final)} records, "
            f"{parsed} reads parsed, none lost or torn"
        )
        assert len(writers) >= 2
    finally:
        server.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def answering_processes(url: str, connections: int) -> Counter[str]:
    """Open ``connections`` connections at once, as a browser or a benchmark does, then ask
    one request on each: how many each process (its worker header) answered."""
    host, port = url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=30) for _ in range(connections)]
    try:
        time.sleep(0.2)  # every connection accepted by now, by whichever process took it
        for s in sockets:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        answered: Counter[str] = Counter()
        for s in sockets:
            head = b""
            while b"\r\n\r\n" not in head:
                data = s.recv(65536)
                assert data, "the connection closed"
                head += data
            match = re.search(rb"(?im)^x-neurotrale-worker: (\d+);", head)
            assert match, head
            answered[match.group(1).decode()] += 1
        return answered
    finally:
        for s in sockets:
            s.close()


def test_connections_opened_at_once_are_shared_by_the_processes(
    start: Callable[..., Twistd], demo_root: Path, tmp_path: Path
) -> None:
    """Every process accepts on the one socket; the first the kernel ran used to take all
    the connections a client opened at once (32/0 to 20/12 between two processes), leaving
    the other core idle for the whole view."""
    server = start(demo_root, tmp_path / "server.log", workers=2)
    for connections in (32, 6, 32):
        answered = answering_processes(server.url, connections)
        assert sorted(answered) == ["0", "1"], answered
        assert min(answered.values()) >= connections // 4, answered


def test_every_worker_serves_tls_with_the_same_certificate(
    start: Callable[..., Twistd], demo_root: Path, tmp_path: Path
) -> None:
    key, cert = self_signed(tmp_path)
    server = start(
        demo_root,
        tmp_path / "server.log",
        f"--listen=ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        workers=2,
    )
    try:
        match = re.search(r"NeurotraleSite \(TLS\) starting on (\d+)", server.log.read_text())
        assert match, server.log.read_text()
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        url = f"https://127.0.0.1:{match.group(1)}{CHUNK}"

        def fetch() -> Any:
            with urllib.request.urlopen(url, context=context, timeout=30) as answer:
                assert len(answer.read()) == 64 * 64 * 32 * 2
                return answer.headers

        parent = server.process.pid
        assert pids_answering(fetch, {parent, *children_of(parent)}) == {
            parent,
            *children_of(parent),
        }
    finally:
        server.stop()


def test_worker_log_lines_reach_the_parents_log_tagged() -> None:
    from types import SimpleNamespace

    from twisted.internet import reactor
    from twisted.logger import (
        LogLevel,
        eventAsJSON,
        formatEventAsClassicLogText,
        globalLogPublisher,
    )
    from twisted.python.failure import Failure

    from neurotrale_twisted.process.workers import WorkerProtocol

    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = {
        "log_format": "decoding {path} failed",
        "path": "brain1/1_1_1/0-64_0-64_0-64.tiff",
        "log_failure": failure,
        "log_level": LogLevel.error,
        "log_namespace": "neurotrale_twisted.web.app",
        "log_time": 1795000000.0,
    }
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        proto = WorkerProtocol(SimpleNamespace(clock=reactor), "worker-2", 2)
        proto.pid = 4242
        line = eventAsJSON(event).encode()
        proto.childDataReceived(1, line[:20])  # lines arrive in pieces
        proto.childDataReceived(1, line[20:] + b"\nnot json\n")
        proto.childDataReceived(2, b"Fatal Python error: Segmentation fault\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    mine = [e for e in seen if e.get("neurotrale_worker") == 2]
    text = [formatEventAsClassicLogText(e) or "" for e in mine]
    assert len(text) == 3
    assert "[worker-2:4242 neurotrale_twisted.web.app#error] decoding brain1/1_1_1/" in text[0]
    assert "ZeroDivisionError" in text[0]  # the traceback came along
    assert "[worker-2:4242 stdout] not json" in text[1]
    assert "[worker-2:4242 stderr] Fatal Python error: Segmentation fault" in text[2]


def test_workers_never_import_a_package_planted_in_the_working_directory(
    start: Callable[..., Twistd], demo_root: Path, tmp_path: Path
) -> None:
    # Someone who can write where the server was started (often the data root itself) plants
    # a package of the server's name: the workers must run the code the parent runs.
    planted = tmp_path / "cwd" / "neurotrale_twisted"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit('planted package imported')\n"
    )
    (planted / "workers.py").write_text("")
    server = start(demo_root, tmp_path / "server.log", workers=2, cwd=planted.parent)
    try:
        parent = server.process.pid
        children = children_of(parent)
        assert len(children) == 1
        assert pids_answering(lambda: get(server.url + CHUNK)[1], {parent, *children}) == {
            parent,
            *children,
        }
        assert not marker.exists()
    finally:
        server.stop()


# --- the pool's supervision, on a fake clock and a fake process reactor -----------------


class FakeProcess:
    """The transport of a process the fake reactor "started": records the signals sent."""

    def __init__(self, pid: int, args: list[str], env: dict[str, str], child_fds: Any) -> None:
        self.pid = pid
        self.args = args
        self.env = env
        self.child_fds = child_fds
        self.signals: list[str] = []
        self.protocol: Any = None
        self.ended = False

    def signalProcess(self, signal_name: str) -> None:
        self.signals.append(signal_name)

    def end(self, signal_number: int | None = 15) -> None:
        """The process exits (killed by ``signal_number``, or with status 0 when None)."""
        from twisted.internet.error import ProcessDone, ProcessTerminated
        from twisted.python.failure import Failure

        if signal_number is None:
            self.protocol.processEnded(Failure(ProcessDone(0)))
        else:
            self.protocol.processEnded(Failure(ProcessTerminated(signal=signal_number)))


class FakeProcessReactor:
    """An ``IReactorProcess`` that starts nothing: it keeps what it was asked to start."""

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []
        self.fail = False

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any = None, **kw: Any):
        if self.fail:
            raise OSError("no more processes")
        process = FakeProcess(1000 + len(self.started), list(args), dict(env), kw["childFDs"])
        process.protocol = protocol
        self.started.append(process)
        protocol.makeConnection(process)
        return process

    def running(self) -> list[FakeProcess]:
        return [p for p in self.started if not p.ended]


class SharedEndpoint:
    """A parent's listener whose socket (descriptor 42 in the parent) the pool shares."""

    description = "tcp:9000"

    def __init__(self) -> None:
        self.turns_taken = 0

    def shared(self, fd: int) -> Any:
        from neurotrale_twisted.process.adopted import SharedSocket

        return 42, SharedSocket(fd, "INET")

    def share_with_workers(self) -> None:
        self.turns_taken += 1  # the parent takes turns accepting with the workers


class UnsharedEndpoint(SharedEndpoint):
    """A listener of a kind workers cannot adopt: the parent serves it alone."""

    description = "other:9001"

    def shared(self, fd: int) -> Any:
        return None


def test_only_the_ports_the_workers_share_take_turns() -> None:
    from twisted.internet.task import Clock

    from neurotrale_twisted.process.workers import WorkerPool

    shared, alone = SharedEndpoint(), UnsharedEndpoint()
    pool = WorkerPool(
        1, ("--path", "/srv"), [alone, shared], CountingMetrics(), FakeProcessReactor(), Clock()
    )
    pool.startService()
    assert (shared.turns_taken, alone.turns_taken) == (1, 0)


class CountingMetrics:
    def __init__(self) -> None:
        self.directories: list[str] = []
        self.restarts = 0

    def share(self, directory: str) -> None:
        self.directories.append(directory)

    def worker_restarted(self) -> None:
        self.restarts += 1


def fake_pool(count: int = 2, arguments: tuple[str, ...] = ("--path", "/srv")) -> Any:
    from twisted.internet.task import Clock

    from neurotrale_twisted.process.workers import WorkerPool

    clock, processes, metrics = Clock(), FakeProcessReactor(), CountingMetrics()
    pool = WorkerPool(count, arguments, [SharedEndpoint()], metrics, processes, clock)
    return pool, clock, processes, metrics


def end(process: FakeProcess, signal_number: int | None = 15) -> None:
    process.ended = True
    process.end(signal_number)


def test_the_pool_stops_every_worker_then_starts_again() -> None:
    pool, clock, processes, metrics = fake_pool(count=2)
    pool.startService()
    first = processes.running()
    assert len(first) == 2
    assert all(p.child_fds == {0: "w", 1: "r", 2: "r", 3: 42} for p in first)
    directory = metrics.directories[0]
    assert os.path.isdir(directory)
    assert all(p.env["PROMETHEUS_MULTIPROC_DIR"] == directory for p in first)

    stopped: list[object] = []
    pool.stopService().addCallback(stopped.append)
    assert [p.signals for p in first] == [["TERM"], ["TERM"]]
    end(first[0])
    assert not stopped  # one is still draining
    clock.advance(pool.kill_after)
    assert first[1].signals == ["TERM", "KILL"]
    end(first[1], 9)
    assert stopped == [None]
    assert not os.path.exists(directory)
    clock.advance(120)
    assert len(processes.started) == 2  # nothing restarted while stopped

    pool.startService()  # and again
    second = processes.running()
    assert len(second) == 2 and not set(second) & set(first)
    assert [p.args[-2:] for p in second] == [["--path", "/srv"]] * 2
    stopped.clear()
    pool.stopService().addCallback(stopped.append)
    for process in second:
        end(process)
    assert stopped == [None]
    assert clock.getDelayedCalls() == []  # no SIGKILL left waiting


def test_a_worker_that_dies_young_is_restarted_after_1_2_4_up_to_60_s() -> None:
    pool, clock, processes, metrics = fake_pool(count=1)
    pool.startService()
    waits = []
    for _ in range(9):
        (process,) = processes.running()
        end(process, 9)
        before = len(processes.started)
        waited = 0.0
        while len(processes.started) == before:
            clock.advance(0.5)
            waited += 0.5
        waits.append(waited)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert metrics.restarts == 9
    # One that ran longer than the threshold is restarted at once, and the wait starts over.
    clock.advance(pool.threshold)
    end(processes.running()[0], 9)
    clock.advance(0)
    assert len(processes.running()) == 1
    end(processes.running()[0], 9)
    clock.advance(0.5)
    assert not processes.running()
    clock.advance(0.5)
    assert len(processes.running()) == 1


def test_a_worker_that_cannot_be_started_is_tried_again_and_stops_cleanly() -> None:
    pool, clock, processes, _ = fake_pool(count=1)
    processes.fail = True
    pool.startService()
    clock.advance(1 + 2)
    assert not processes.started
    processes.fail = False
    clock.advance(4)
    assert len(processes.running()) == 1
    stopped: list[object] = []
    pool.stopService().addCallback(stopped.append)
    end(processes.running()[0])
    assert stopped == [None]


def test_a_worker_parses_the_parents_own_arguments_with_the_same_options(tmp_path: Path) -> None:
    from twisted.internet import reactor

    from neurotrale_twisted.process.adopted import Inherited, SharedSocket
    from neurotrale_twisted.process.options import Options
    from neurotrale_twisted.process.service import makeService
    from neurotrale_twisted.process.workers import _WORKER_BOOT, WorkerPool

    arguments = ["--path", str(tmp_path), "--workers", "3", "--keep-versions", "5", "--read-only"]
    options = Options()
    options.parseOptions(arguments)
    (pool,) = [s for s in makeService(options, reactor) if isinstance(s, WorkerPool)]
    assert pool.count == 2
    pool._sockets = (SharedSocket(3, "INET"),)
    command = pool.command(1)
    assert command[1:3] == ["-c", _WORKER_BOOT]
    assert json.loads(command[3])  # the parent's import path
    assert Inherited.from_json(command[4]) == Inherited(1, (SharedSocket(3, "INET"),))
    assert command[5:] == arguments
    again = Options()
    again.parseOptions(command[5:])  # through postOptions: the defaults are filled in
    assert dict(again) == dict(options)
    assert again["listen"] == ["tcp:9000"] and again["threads"] == options["threads"]


def test_the_pool_never_imports_the_service() -> None:
    # The service builds the pool; a worker process builds the service: workers.py and
    # adopted.py import neither service.py nor worker.py, not even inside a function.
    import ast

    package = Path(__file__).parent.parent / "neurotrale_twisted" / "process"
    for name in ("workers.py", "adopted.py"):
        imported = set()
        for node in ast.walk(ast.parse((package / name).read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        forbidden = {".service", ".worker", ".command"} | {
            f"neurotrale_twisted.process.{module}" for module in ("service", "worker", "command")
        }
        assert not imported & forbidden, (name, imported & forbidden)
        assert "procmon" not in (package / name).read_text()
