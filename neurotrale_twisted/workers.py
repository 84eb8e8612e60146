"""The pool behind ``--workers N``: a parent that listens, N-1 children that adopt its sockets.

The parent opens every ``--listen`` endpoint (``tcp:``, ``unix:``, ``ssl:``, ``systemd:``), and
:class:`WorkerPool` (Twisted's ``ProcessMonitor``, which restarts a process that dies, with a
back-off when it dies young) starts N-1 copies of this module's :func:`main` with the
listening sockets as file descriptors 3, 4, .... Each child builds the same application as
the parent (its own reactor, thread pool and decoder) and adopts the sockets with
``reactor.adoptStreamPort``; the kernel hands each new connection to one of the processes
waiting on the socket, so every core serves. An ``ssl:`` socket is adopted as TCP and
wrapped in TLS with the endpoint's own certificate, exactly as the parent's is.

Children log JSON lines on their stdout; the parent re-emits each event into its own log
(twistd's log file or stdout, and ``$PRECOMPUTED_LOGGING``) tagged ``worker-I:PID``. A child
stops when its stdin (a pipe from the parent) closes, so none outlives a killed parent, and
on SIGTERM, like the parent, after answering the requests it is busy with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import abstract, fdesc, protocol, tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import (
    Logger,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from .connections import guard_port
from .metrics import MULTIPROCESS_ENV, ServerMetrics

if TYPE_CHECKING:
    from .service import Options, ThreadPoolService
    from .serving import ServingSite

log = Logger()

#: Seconds a stopping process waits for the requests in flight to be answered.
DRAIN_SECONDS = 8
#: The first file descriptor of the inherited sockets in a child.
FIRST_INHERITED_FD = 3
#: Options key under which a child finds its index and its inherited sockets.
WORKER_KEY = "worker"
#: Environment variables that belong to the parent alone.
_PARENT_ONLY_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
_ADDRESSES = ((IPv6Address, "INET6"), (IPv4Address, "INET"), (UNIXAddress, "UNIX"))


@dataclass(frozen=True)
class SharedSocket:
    """A listening socket the parent passes to its children.

    ``fd`` is its number in the child, ``family`` ``INET``, ``INET6`` or ``UNIX``, and
    ``tls`` the ``ssl:`` endpoint description whose certificate wraps it, if any.
    """

    fd: int
    family: str
    tls: str | None = None


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """An endpoint that remembers the port it listened on, to share it with the children."""

    def __init__(self, endpoint: IStreamServerEndpoint, description: str) -> None:
        self.endpoint = endpoint
        self.description = description
        self.port: IListeningPort | None = None

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen, keep the port, and let it admit only what the site admits."""
        from twisted.internet import reactor

        def keep(port: IListeningPort) -> IListeningPort:
            self.port = port
            admit = getattr(factory, "admit", None)
            if admit is not None:
                guard_port(port, admit, reactor)  # type: ignore[arg-type]
            return port

        return self.endpoint.listen(factory).addCallback(keep)

    def shared(self, fd: int) -> tuple[int, SharedSocket] | None:
        """The parent's descriptor of the port and how a child adopts it as ``fd``, or None
        when the port is not a stream socket a child can adopt."""
        port = self.port
        fileno = getattr(port, "fileno", None)
        if port is None or fileno is None:
            return None
        kind = self.description.split(":", 1)[0].strip().lower()
        if kind not in ("tcp", "tcp6", "unix", "ssl", "systemd"):
            return None
        host = port.getHost()
        family = next((name for kind, name in _ADDRESSES if isinstance(host, kind)), None)
        if family is None:
            return None
        return fileno(), SharedSocket(fd, family, self.description if kind == "ssl" else None)


def serve(
    options: Options, site: ServingSite, top: service.MultiService, threads: ThreadPoolService
) -> None:
    """Add the listeners of ``options`` to ``top``, and the pool of worker processes.

    In the parent: one listener per ``--listen``, and with ``--workers N`` over 1 a
    :class:`WorkerPool` of N-1 children. In a child: the sockets it inherited. Either way,
    stopping waits for the requests in flight before the thread pool stops.
    """
    from twisted.internet import reactor

    threads.drained = lambda: site.drain(reactor, DRAIN_SECONDS)  # type: ignore[arg-type]
    worker = options.get(WORKER_KEY)
    if worker is not None:
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            site.metrics.share(directory)
        for shared in worker["sockets"]:
            AdoptedSocketService(SharedSocket(**shared), site).setServiceParent(top)
        return
    endpoints = []
    for description in options["listen"]:
        listener = strports.service(description, site)
        assert isinstance(listener, StreamServerEndpointService)
        endpoint = _RecordingEndpoint(listener.endpoint, description)
        listener.endpoint = endpoint
        listener.setServiceParent(top)
        endpoints.append(endpoint)
    if options["workers"] > 1:
        WorkerPool(options, endpoints, site.metrics).setServiceParent(top)


# --- the parent ---------------------------------------------------------------------------


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
        """Relay each complete line of the child's stdout (JSON events) or stderr (text)."""
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        if not line.strip():
            return
        text = line.decode("utf-8", "replace")
        event: dict[str, Any] | None = None
        if childFD == 1:
            try:
                event = eventFromJSON(text)
            except ValueError:
                event = None
        if not isinstance(event, dict):
            event = {
                "log_format": "{line}",
                "line": text,
                "log_level": None,
                "log_namespace": "neurotrale_twisted.workers",
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


class WorkerPool(ProcessMonitor):
    """N-1 child processes serving the parent's listening sockets; restarted when they die.

    ``ProcessMonitor`` gives the restart with back-off (a child that dies within
    ``threshold`` seconds of its start waits 1, 2, 4, ... up to ``maxRestartDelay`` seconds)
    and SIGTERM, then SIGKILL after ``killTime``, at shutdown; this class passes the
    sockets to the children and waits for them to exit before the parent does.
    """

    threshold = 10
    killTime = DRAIN_SECONDS + 2
    maxRestartDelay = 60

    def __init__(
        self, options: Options, endpoints: Sequence[_RecordingEndpoint], metrics: ServerMetrics
    ) -> None:
        from twisted.internet import reactor

        super().__init__(reactor)  # type: ignore[arg-type]
        self.clock = reactor
        self.options = options
        self.endpoints = endpoints
        self.metrics = metrics
        self.count = options["workers"] - 1
        self.directory: str | None = None
        self._child_fds: dict[int, int] = {}
        self._commands: dict[str, list[str]] = {}
        self._exits: dict[str, list[Deferred[None]]] = {}

    def startService(self) -> None:
        """Share the listening sockets and the metrics directory, then start the children."""
        sockets: list[dict[str, object]] = []
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
            sockets.append(socket_info.__dict__)
        if not sockets:
            log.warn("no listening socket can be shared: the parent process serves alone")
            super().startService()
            return
        self.directory = tempfile.mkdtemp(prefix="neurotrale-metrics-")
        self.metrics.share(self.directory)
        options = {key: value for key, value in self.options.items() if key != WORKER_KEY}
        for index in range(1, self.count + 1):
            name = f"worker-{index}"
            blob = json.dumps({"index": index, "sockets": sockets, "options": options}, default=str)
            self._commands[name] = [sys.executable, "-c", _WORKER_BOOT, blob, _import_path()]
            self.addProcess(name, self._commands[name], env=self._child_environment())
        log.info("starting {n} worker process(es) beside this one", n=self.count)
        super().startService()

    def _child_environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY_ENV}
        env.pop("PRECOMPUTED_LOGGING", None)  # the parent writes every process's log
        assert self.directory is not None
        env[MULTIPROCESS_ENV] = self.directory
        return env

    def startProcess(self, name: str) -> None:
        """Start one child with the listening sockets as its descriptors 3, 4, ..."""
        if name in self.protocols:
            return
        index = int(name.rsplit("-", 1)[1])
        proto = WorkerProtocol(self, name, index)
        self.protocols[name] = proto  # type: ignore[assignment]
        self.timeStarted[name] = self.clock.seconds()
        child_fds: dict[int, str | int] = {0: "w", 1: "r", 2: "r", **self._child_fds}
        try:
            self.clock.spawnProcess(  # type: ignore[attr-defined]
                proto,
                sys.executable,
                self._commands[name],
                env=self._child_environment(),
                childFDs=child_fds,
            )
        except OSError:
            self._monitoredProcessExited(name, Failure())

    def worker_exited(self, proto: WorkerProtocol, reason: Failure) -> None:
        """Forget the child's live gauges; restart it unless the server is stopping."""
        if self.directory is not None and proto.pid:
            ServerMetrics.process_exited(self.directory, proto.pid)
        if self.running:
            self.metrics.worker_restarted()
            log.warn(
                "worker {index} (pid {pid}) exited: {why}; restarting it",
                index=proto.index,
                pid=proto.pid,
                why=reason.getErrorMessage(),
            )
        self._monitoredProcessExited(proto.name, reason)
        for waiting in self._exits.pop(proto.name, []):
            waiting.callback(None)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Stop every child (SIGTERM, SIGKILL after ``killTime``) and wait until they exit."""
        waits: list[Deferred[None]] = []
        for name in list(self.protocols):
            waiting: Deferred[None] = Deferred()
            self._exits.setdefault(name, []).append(waiting)
            waits.append(waiting)
        super().stopService()
        log.info("stopping {n} worker process(es)", n=len(waits))
        done = DeferredList(waits) if waits else succeed([])

        def clean_up(_: object) -> None:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

        return done.addCallback(clean_up)


# --- a child ------------------------------------------------------------------------------


class _AdoptedUNIXPort(unix.Port):  # type: ignore[misc]
    """A UNIX socket adopted from the parent: stopping it leaves the socket alone.

    Twisted's UNIX port shuts its socket down and removes its file when it stops; both are
    the parent's, which still serves on them (TCP ports adopted this way already skip the
    shutdown).
    """

    _shouldShutdown = False

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


class AdoptedSocketService(service.Service):
    """Serves ``site`` on a listening socket inherited from the parent."""

    def __init__(self, shared: SharedSocket, site: ServingSite) -> None:
        self.shared = shared
        self.site = site
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Adopt the socket (before privileges are dropped, like the parent's listen)."""
        from twisted.internet import reactor

        super().privilegedStartService()
        factory: IProtocolFactory = self.site
        if self.shared.tls is not None:
            endpoint = serverFromString(reactor, self.shared.tls)
            # The endpoint parsed the certificate options exactly as the parent's did.
            context = endpoint._sslContextFactory  # type: ignore[attr-defined]
            factory = TLSMemoryBIOFactory(context, False, self.site)
        fd = self.shared.fd
        fdesc.setNonBlocking(fd)
        if self.shared.family == "UNIX":
            port = _AdoptedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
            with socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                path = probe.getsockname()
            if isinstance(path, str) and path and not path.startswith("\0"):
                port.mode = stat.S_IMODE(os.stat(path).st_mode)  # keep the parent's mode
            port.startListening()
            self.port = port
        else:
            self.port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
                fd, _FAMILIES[self.shared.family], factory
            )
        guard_port(self.port, self.site.admit, reactor)  # type: ignore[arg-type]
        os.close(fd)  # the port holds its own duplicate

    def startService(self) -> None:
        """Adopt the socket if that was not done yet."""
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        """Stop accepting connections on the socket."""
        super().stopService()
        if self.port is None:
            return None
        return self.port.stopListening()  # type: ignore[return-value]


class _ParentWatch(abstract.FileDescriptor):
    """Reads the child's stdin, a pipe from the parent: end of file means the parent is gone."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        super().__init__()
        self.on_close = on_close
        fdesc.setNonBlocking(0)

    def fileno(self) -> int:
        """Standard input."""
        return 0

    def doRead(self) -> Any:
        """Discard what the parent sends; report the end of the pipe."""
        return fdesc.readFromFD(0, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        """The parent went away: stop serving."""
        super().connectionLost(reason)
        self.on_close()


#: How a worker process starts: with the parent's import path, then :func:`main`. Not
#: ``python -m``, which puts the working directory first on the path, so that a directory named
#: ``neurotrale_twisted`` there (the data root, a source tree, anything someone could write)
#: would be the code the workers run.
_WORKER_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from neurotrale_twisted.workers import main; main(sys.argv[1:2])"
)


def _import_path() -> str:
    """This process's import path, as JSON, for a worker to import exactly what it imported."""
    return json.dumps([os.path.abspath(entry) if entry else os.getcwd() for entry in sys.path])


def main(argv: Sequence[str] | None = None) -> None:
    """A worker process: build the application from the parent's options, serve until told
    to stop (SIGTERM or SIGINT) or until the parent goes away."""
    from twisted.internet import reactor

    from .service import Options, makeService

    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(args[0])
    index = int(spec["index"])
    stdout = sys.stdout
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(stdout, recordSeparator="")])

    options = Options()
    options.update(spec["options"])
    options["workers"] = 1
    options[WORKER_KEY] = {"index": index, "sockets": spec["sockets"]}
    top = makeService(options)
    top.privilegedStartService()

    stopping: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)  # type: ignore[attr-defined]

    def stop(why: str) -> None:
        # Once: a worker can be told twice (SIGTERM from the parent and from a `kill` of the
        # whole process group), and a second reactor.stop() is an error.
        if not stopping:
            stopping.append(True)
            log.info("worker {index}: {why}; stopping", index=index, why=why)
            reactor.stop()  # type: ignore[attr-defined]

    def parent_gone() -> None:
        stop("the parent process is gone")

    def install_signal_handlers() -> None:
        # Ctrl-C in a terminal reaches the whole process group; the parent stops the
        # workers itself, in order, so a worker must not stop (and be restarted) first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(
            signal.SIGTERM,
            lambda *_: reactor.callFromThread(stop, "received SIGTERM"),  # type: ignore[attr-defined]
        )

    watch = _ParentWatch(parent_gone)
    reactor.callWhenRunning(install_signal_handlers)  # type: ignore[attr-defined]
    reactor.addReader(watch)  # type: ignore[attr-defined]
    reactor.callWhenRunning(top.startService)  # type: ignore[attr-defined]
    reactor.callWhenRunning(  # type: ignore[attr-defined]
        log.info,
        "worker {index} serving on {n} inherited socket(s)",
        index=index,
        n=len(spec["sockets"]),
    )
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    # Everything is stopped and logged; skip the interpreter's slow teardown of numpy & co.
    stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    # Run main from the module under its own name, not as __main__, so that the classes
    # makeService imports are the same ones.
    from neurotrale_twisted import workers

    workers.main()
