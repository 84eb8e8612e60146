"""The pool behind ``--workers N``: a parent that listens, N-1 children that adopt its sockets.

The parent opens every ``--listen`` endpoint (``tcp:``, ``unix:``, ``ssl:``, ``systemd:``;
:func:`listen`), and :class:`WorkerPool` starts N-1 worker processes
(:mod:`neurotrale_twisted.process.worker`) with ``spawnProcess``, the listening sockets as their
file descriptors 3, 4, ... (``childFDs``). A worker parses the parent's own command-line
arguments with the same :class:`~neurotrale_twisted.process.options.Options`, builds the same
application (its own reactor, thread pool and decoder) and adopts the sockets
(:mod:`neurotrale_twisted.process.adopted`); the kernel hands each new connection to one of the
processes waiting on the socket, so every core serves.

The supervision is the pool's own, on ``callLater``: a worker that dies is started again, at
once if it had run :attr:`WorkerPool.threshold` seconds, else after 1, 2, 4, ... up to
:attr:`WorkerPool.max_restart_delay` seconds; stopping the pool sends SIGTERM to each worker
(which answers the requests it is busy with, then exits), SIGKILL to one still there after
:attr:`WorkerPool.kill_after` seconds, and waits until every one has exited. A stopped pool
starts again.

Workers log JSON lines on their stdout, and their access-log lines in batches
(:mod:`.accesslines`); the parent re-emits each event into its own log (twistd's log file or
stdout, and ``$PRECOMPUTED_LOGGING``) tagged ``worker-I:PID``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorProcess,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import LogEvent, Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from neurotrale_twisted.process import accesslines
from neurotrale_twisted.process.adopted import Inherited, SharedSocket
from neurotrale_twisted.web.connections import guard_port, share_accepts
from neurotrale_twisted.web.metrics import MULTIPROCESS_ENV, ServerMetrics
from neurotrale_twisted.web.serving import ServingSite

log = Logger()

#: Seconds a stopping process waits for the requests in flight to be answered.
DRAIN_SECONDS = 8
#: The first file descriptor of the inherited sockets in a child.
FIRST_INHERITED_FD = 3
#: Environment variables that belong to the parent alone.
_PARENT_ONLY_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
_ADDRESSES = ((IPv6Address, "INET6"), (IPv4Address, "INET"), (UNIXAddress, "UNIX"))
#: The endpoint types whose listening socket a child can adopt.
_SHAREABLE = ("tcp", "tcp6", "unix", "ssl", "systemd")


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """An endpoint that remembers the port it listened on, to share it with the children."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        description: str,
        clock: IReactorTime,
    ) -> None:
        self.endpoint = endpoint
        self.description = description
        self.clock = clock
        self.port: IListeningPort | None = None
        self.factory: IProtocolFactory | None = None

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen, keep the port, and let it admit only what the site admits."""

        def keep(port: IListeningPort) -> IListeningPort:
            self.port = port
            self.factory = factory
            admit = getattr(factory, "admit", None)
            if admit is not None:
                guard_port(port, admit, self.clock)
            return port

        return self.endpoint.listen(factory).addCallback(keep)

    def share_with_workers(self) -> None:
        """Take this process's share of the port's new connections, the workers that adopt
        it taking theirs (:func:`~neurotrale_twisted.web.connections.share_accepts`)."""
        site = self.factory
        if self.port is not None and isinstance(site, ServingSite):
            share_accepts(self.port, lambda: site.open_connections, self.clock)

    def shared(self, fd: int) -> tuple[int, SharedSocket] | None:
        """The parent's descriptor of the port and how a child adopts it as ``fd``, or None
        when the port is not a stream socket a child can adopt."""
        port = self.port
        fileno = getattr(port, "fileno", None)
        if port is None or fileno is None:
            return None
        kind = self.description.split(":", 1)[0].strip().lower()
        if kind not in _SHAREABLE:
            return None
        host = port.getHost()
        family = next((name for kind, name in _ADDRESSES if isinstance(host, kind)), None)
        if family is None:
            return None
        return fileno(), SharedSocket(fd, family, self.description if kind == "ssl" else None)


def listen(
    descriptions: Sequence[str], site: ServingSite, top: service.MultiService, clock: IReactorTime
) -> list[_RecordingEndpoint]:
    """Add to ``top`` one listener per endpoint description (Twisted's ``strports``); the
    endpoints returned remember their ports, for a :class:`WorkerPool` to share."""
    endpoints = []
    for description in descriptions:
        listener = strports.service(description, site)
        assert isinstance(listener, StreamServerEndpointService)
        endpoint = _RecordingEndpoint(listener.endpoint, description, clock)
        listener.endpoint = endpoint
        listener.setServiceParent(top)
        endpoints.append(endpoint)
    return endpoints


class WorkerProtocol(protocol.ProcessProtocol):
    """One child as the parent sees it: relays its log, and tells the pool when it ends."""

    def __init__(self, pool: WorkerPool, name: str, index: int) -> None:
        self.pool = pool
        self.name = name
        self.index = index
        self.pid = 0
        self._partial: dict[int, bytes] = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        """Note the child's process id."""
        assert self.transport is not None
        self.pid = self.transport.pid or 0
        log.info("worker {index} started, pid {pid}", index=self.index, pid=self.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Relay each complete line of the child's stdout (JSON events, batched access-log
        lines) or stderr (text)."""
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        if not line.strip():
            return
        event: LogEvent | None = None
        if childFD == 1:
            event = accesslines.decode(line)
            if event is None:
                try:
                    event = eventFromJSON(line.decode("utf-8", "replace"))
                except ValueError:
                    event = None
        if not isinstance(event, dict):
            text = line.decode("utf-8", "replace")
            event = {
                "log_format": "{line}",
                "line": text,
                "log_level": None,
                "log_namespace": "neurotrale_twisted.process.workers",
                "log_time": self.pool.clock.seconds(),
                "log_system": "stderr" if childFD == 2 else "stdout",
            }
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        event["log_system"] = f"worker-{self.index}:{self.pid} {system}"
        event["neurotrale_worker"] = self.index
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        """Relay what is left of the output, and let the pool restart the child."""
        for fd, rest in self._partial.items():
            if rest:
                self._relay(fd, rest)
        self._partial = {}
        self.pool.worker_exited(self, reason)


class SharedListener(Protocol):
    """A listener of the parent's whose socket the pool may pass to the workers."""

    description: str

    def shared(self, fd: int) -> tuple[int, SharedSocket] | None:
        """The parent's descriptor and how a worker adopts it as ``fd``; None if it cannot."""

    def share_with_workers(self) -> None:
        """Take the parent's share of the new connections, the workers taking theirs."""


@dataclass
class _Worker:
    """One place in the pool: the process in it now (if any) and when to start the next."""

    index: int
    #: Seconds to wait before starting the next process if this one dies young.
    delay: float
    process: WorkerProtocol | None = None
    started: float = 0.0
    restart: IDelayedCall | None = None


@dataclass
class _Stopping:
    """A process told to stop: fires ``exited`` when it has, is killed by ``kill`` if late."""

    exited: Deferred[None]
    kill: IDelayedCall


class WorkerPool(service.Service):
    """``count`` worker processes serving the parent's listening sockets.

    ``arguments`` are the parent's command-line options (each worker parses them again);
    ``endpoints`` the parent's listeners, whose sockets are shared when the pool starts.
    ``processes`` spawns the workers and ``clock`` times their restarts and their stop.
    """

    #: A worker that ran this many seconds is restarted at once; one that died younger waits.
    threshold = 10.0
    #: The first and the longest wait before a worker that died young is started again.
    min_restart_delay = 1.0
    max_restart_delay = 60.0
    #: Seconds after SIGTERM before a worker still running is killed.
    kill_after = DRAIN_SECONDS + 2

    def __init__(
        self,
        count: int,
        arguments: Sequence[str],
        endpoints: Sequence[SharedListener],
        metrics: ServerMetrics,
        processes: IReactorProcess,
        clock: IReactorTime,
    ) -> None:
        self.count = count
        self.arguments = list(arguments)
        self.endpoints = endpoints
        self.metrics = metrics
        self.processes = processes
        self.clock = clock
        self.directory: str | None = None
        self._workers: dict[int, _Worker] = {}
        self._stopping: dict[WorkerProtocol, _Stopping] = {}
        self._child_fds: dict[int, int | str] = {}
        self._sockets: tuple[SharedSocket, ...] = ()

    def startService(self) -> None:
        """Share the listening sockets and the metrics directory, then start the workers."""
        super().startService()
        sockets: list[SharedSocket] = []
        self._child_fds = {0: "w", 1: "r", 2: "r"}
        for endpoint in self.endpoints:
            shared = endpoint.shared(FIRST_INHERITED_FD + len(sockets))
            if shared is None:
                log.warn(
                    "{description} is served by the parent process only",
                    description=endpoint.description,
                )
                continue
            parent_fd, socket_info = shared
            self._child_fds[socket_info.fd] = parent_fd
            sockets.append(socket_info)
            endpoint.share_with_workers()
        if not sockets:
            log.warn("no listening socket can be shared: the parent process serves alone")
            return
        self._sockets = tuple(sockets)
        self.directory = tempfile.mkdtemp(prefix="neurotrale-metrics-")
        self.metrics.share(self.directory)
        log.info("starting {n} worker process(es) beside this one", n=self.count)
        self._workers = {i: _Worker(i, self.min_restart_delay) for i in range(1, self.count + 1)}
        for worker in self._workers.values():
            self._start(worker)

    def command(self, index: int) -> list[str]:
        """The command line of worker ``index``: the parent's import path, what the worker
        inherits, and the parent's own options."""
        inherited = Inherited(index, self._sockets).to_json()
        return [sys.executable, "-c", _WORKER_BOOT, _import_path(), inherited, *self.arguments]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY_ENV}
        env.pop("PRECOMPUTED_LOGGING", None)  # the parent writes every process's log
        assert self.directory is not None
        env[MULTIPROCESS_ENV] = self.directory
        return env

    def _start(self, worker: _Worker) -> None:
        """Start a process in ``worker``'s place, the listening sockets as its 3, 4, ..."""
        worker.restart = None
        process = worker.process = WorkerProtocol(self, f"worker-{worker.index}", worker.index)
        worker.started = self.clock.seconds()
        try:
            self.processes.spawnProcess(
                process,
                sys.executable,
                self.command(worker.index),
                env=self._environment(),
                childFDs=self._child_fds,
            )
        except OSError:
            self.worker_exited(process, Failure())

    def worker_exited(self, process: WorkerProtocol, reason: Failure) -> None:
        """Forget the process's live gauges; start another in its place while the pool runs
        (after a wait if it died young), or note that it stopped."""
        if self.directory is not None and process.pid:
            ServerMetrics.process_exited(self.directory, process.pid)
        stopping = self._stopping.pop(process, None)
        if stopping is not None:
            if stopping.kill.active():
                stopping.kill.cancel()
            stopping.exited.callback(None)
            return
        worker = self._workers.get(process.index)
        if worker is None or worker.process is not process:
            return
        worker.process = None
        if self.clock.seconds() - worker.started < self.threshold:
            delay = worker.delay
            worker.delay = min(delay * 2, self.max_restart_delay)
        else:
            delay, worker.delay = 0.0, self.min_restart_delay
        self.metrics.worker_restarted()
        log.warn(
            "worker {index} (pid {pid}) exited: {why}; restarting it in {delay:g} s",
            index=process.index,
            pid=process.pid,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        worker.restart = self.clock.callLater(delay, self._start, worker)

    def stopService(self) -> Deferred[None]:
        """Stop every worker (SIGTERM, SIGKILL after :attr:`kill_after` seconds) and fire
        once all have exited."""
        super().stopService()
        workers, self._workers = self._workers, {}
        waits: list[Deferred[None]] = []
        for worker in workers.values():
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            process = worker.process
            if process is None:
                continue
            kill = self.clock.callLater(self.kill_after, self._signal, process, "KILL")
            stopping = self._stopping[process] = _Stopping(Deferred(), kill)
            waits.append(stopping.exited)
            self._signal(process, "TERM")
        log.info("stopping {n} worker process(es)", n=len(waits))
        directory = self.directory

        def clean_up(_: object) -> None:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            if self.directory == directory:
                self.directory = None

        return gatherResults(waits).addCallback(clean_up)

    @staticmethod
    def _signal(process: WorkerProtocol, signal: str) -> None:
        """Send ``signal`` to ``process`` unless it is gone already."""
        if process.transport is None:
            return
        with contextlib.suppress(ProcessExitedAlready):  # its processEnded is on its way
            process.transport.signalProcess(signal)


#: How a worker process starts: with the parent's import path, then
#: :func:`neurotrale_twisted.process.worker.main`.
#: Not ``python -m``, which puts the working directory
#: first on the path, so that a directory named ``neurotrale_twisted`` there (the data root, a
#: source tree, anything someone could write) would be the code the workers run.
_WORKER_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from neurotrale_twisted.process.worker import main; main(sys.argv[2:])"
)


def _import_path() -> str:
    """This process's import path, as JSON, for a worker to import exactly what it imported."""
    return json.dumps([os.path.abspath(entry) if entry else os.getcwd() for entry in sys.path])
