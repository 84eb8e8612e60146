"""The service ``twistd neurotrale`` runs: :func:`makeService` builds it from the parsed
:class:`~neurotrale_twisted.process.options.Options` on the reactor it is given.

Shaped like Twisted's own ``twistd web``: a ``MultiService`` holding the thread pool, one
listener per ``--listen`` endpoint and, with ``--workers N``, the pool of worker processes.
It also hands the core's standard-library log records to Twisted's log
(:func:`forward_core_logging`): the core knows nothing of Twisted.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorTime,
)
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from neurotrale_twisted.core.annotations.store import remove_stale_temporaries
from neurotrale_twisted.core.datasets import find_datasets
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.process.adopted import Inherited, serve_inherited
from neurotrale_twisted.process.options import Options
from neurotrale_twisted.process.workers import DRAIN_SECONDS, WorkerPool, listen
from neurotrale_twisted.web.app import Neurotrale
from neurotrale_twisted.web.connections import (
    FD_SETSIZE,
    default_max_connections,
    raise_open_file_limit,
    reserved_descriptors,
)
from neurotrale_twisted.web.cors import CorsPolicy
from neurotrale_twisted.web.metrics import MULTIPROCESS_ENV, ServerMetrics
from neurotrale_twisted.web.serving import AccessLogFile, ServingSite
from neurotrale_twisted.web.site import HttpSettings

log = Logger()

#: Standard-library log levels as Twisted's.
_LEVELS = (
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


class _TwistedLogHandler(logging.Handler):
    """Emits a standard-library log record as a Twisted log event in the namespace of the
    module that logged it (``neurotrale_twisted.core.annotations.commitlog``), so it is
    written where the server's own lines are, in the same format."""

    def emit(self, record: logging.LogRecord) -> None:
        """Hand ``record`` to Twisted's global log publisher."""
        level = next((twisted for std, twisted in _LEVELS if record.levelno >= std), LogLevel.debug)
        Logger(namespace=record.name).emit(level, "{message}", message=record.getMessage())


#: ``mallopt``'s ``M_ARENA_MAX`` (glibc), and the arenas a process keeps.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Let the C allocator keep :data:`MALLOC_ARENAS` arenas, not eight per core.

    glibc gives each thread that allocates at once an arena of its own, and a 512 KiB
    chunk freed in one is not reused by another: with the thread pool, the process's memory
    grew by arenas it hardly used. Measured with ``--workers 2`` after the benchmark's
    sequence and 100 connections (``VmHWM``): 148/146 and 146/145 MB per process without,
    141/144 and 138/138 MB with (what ``MALLOC_ARENA_MAX=2`` does, set here before any
    thread starts). The interpreter lock serialises most allocations anyway. True when the
    C library took it (False elsewhere: musl, macOS).
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    except (AttributeError, OSError):
        return False


def forward_core_logging() -> None:
    """Send what the core logs (through :mod:`logging`) to Twisted's log, once per process."""
    core = logging.getLogger("neurotrale_twisted.core")
    if not any(isinstance(handler, _TwistedLogHandler) for handler in core.handlers):
        core.addHandler(_TwistedLogHandler())
        core.setLevel(logging.INFO)
        core.propagate = False


def clean_stale_temporaries(root: DataRoot) -> None:
    """Remove temporary files left by writers that died (runs on a thread at start-up)."""
    now = time.time()
    removed = sum(
        remove_stale_temporaries(root, dataset, STALE_AFTER, now) for dataset in find_datasets(root)
    )
    if removed:
        log.info("removed {n} temporary file(s) left by interrupted writes", n=removed)


#: Age in seconds after which a temporary file of an annotation write is surely abandoned.
STALE_AFTER = 600.0


class ThreadPoolService(service.Service):
    """Starts the server's own thread pool with the application and stops it at shutdown.

    ``drained``, when set, is waited for before the pool stops: the requests in flight
    still need the pool to be answered.
    """

    def __init__(self, pool: ThreadPool, root: DataRoot | None = None) -> None:
        self.pool = pool
        self.root = root
        self.drained: Callable[[], Deferred[None]] | None = None

    def startService(self) -> None:
        """Start the pool's threads, and clean up after interrupted writes in one of them."""
        super().startService()
        self.pool.start()
        if self.root is not None:
            self.pool.callInThread(clean_stale_temporaries, self.root)

    def stopService(self) -> Deferred[None] | None:
        """Let running jobs finish, then stop the threads."""
        super().stopService()
        if self.drained is None:
            self.pool.stop()
            return None
        return self.drained().addCallback(lambda _: self.pool.stop())


def log_to_file_from_environment(reactor: IReactorCore) -> None:
    """Send the log to ``$PRECOMPUTED_LOGGING`` when it names a file.

    twistd begins logging after ``makeService`` and then replays what was logged before to
    every observer, this one too: each event is written once (until ``reactor`` runs).
    """
    target = os.environ.get("PRECOMPUTED_LOGGING")
    if not target:
        return
    stream = open(target, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    write = textFileLogObserver(stream)
    # The events written before the reactor runs, by id (the replayed ones are the same
    # objects; holding them keeps their ids from being reused meanwhile).
    early: dict[int, LogEvent] | None = {}

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if early is not None:
            if id(event) in early:
                return
            early[id(event)] = event
        write(event)

    def running() -> None:
        nonlocal early
        early = None

    globalLogPublisher.addObserver(observe)
    reactor.callWhenRunning(running)


def connection_limit(options: Options, reactor: object, worker: int) -> int:
    """Raise the open-file limit of this process and choose its ``--max-connections``.

    The parent says what it chose; a worker inherits the parent's raised limit and says
    nothing unless it had to raise it again.
    """
    # select() watches descriptors below FD_SETSIZE only.
    select_based = type(reactor).__module__ == "twisted.internet.selectreactor"
    files = raise_open_file_limit(FD_SETSIZE if select_based else None)
    threads, workers = options["threads"], options["workers"]
    chosen = options["max-connections"]
    limit = chosen or default_max_connections(files.soft, threads, workers)
    if worker == 0 or files.soft != files.before:
        log.info(
            "open files: {soft} per process (the soft limit was {before}, the hard limit is "
            "{hard}); at most {limit} connections per process",
            soft=files.soft,
            before=files.before,
            hard=files.hard,
            limit=limit,
        )
    reserve = reserved_descriptors(threads, workers)
    if chosen is not None and chosen > files.soft - reserve and worker == 0:
        log.warn(
            "--max-connections {limit} leaves fewer than {reserve} of the {soft} descriptors a "
            "process may open for files: a flood of connections can make reads and writes fail",
            limit=chosen,
            reserve=reserve,
            soft=files.soft,
        )
    return int(limit)


def makeService(
    options: Options,
    reactor: IReactorCore,
    worker: Inherited | None = None,
    access_log: AccessLogFile | None = None,
) -> service.MultiService:
    """Build the server on ``reactor``: the thread pool, the application, one listener per
    ``--listen`` and, with ``--workers N`` over 1, the pool of N-1 worker processes; in a
    worker process (``worker``), the sockets it inherited instead.

    The access log goes to ``access_log``, or else to this process's log.

    ``reactor`` must also provide ``IReactorTime``, ``IReactorFromThreads``,
    ``IReactorSocket`` and ``IReactorProcess``, as Twisted's reactors do (TypeError if not).
    """
    clock = IReactorTime(reactor)
    log_to_file_from_environment(reactor)
    forward_core_logging()
    limit_malloc_arenas()
    top = service.MultiService()
    pool = ThreadPool(minthreads=0, maxthreads=options["threads"], name="neurotrale")
    cors = CorsPolicy(tuple(options["cors-origin"]) or ("*",))
    root = DataRoot(options["path"], follow_symlinks=bool(options["follow-symlinks"]))
    index = 0 if worker is None else worker.index
    # The parent cleans up after interrupted writes; its workers need not do it again.
    threads = ThreadPoolService(pool, None if index else root)
    threads.setServiceParent(top)
    max_connections = connection_limit(options, reactor, index)
    metrics = ServerMetrics()
    app = Neurotrale(
        root,
        pool,
        IReactorFromThreads(reactor),
        keep_versions=options["keep-versions"],
        cors=cors,
        metrics=metrics,
        cache_bytes=options["cache-mb"] * 1024 * 1024,
        read_only=bool(options["read-only"]),
        htpasswd=options["htpasswd"],
        auth_reads=bool(options["auth-reads"]),
    )
    # The parent of workers relays their logs: its reactor never waits on the disk.
    app.hits.enabled = worker is not None or options["workers"] <= 1
    settings = HttpSettings(
        cors=cors,
        max_body=options["max-body"] * 1024 * 1024,
        max_header_bytes=options["max-header-kb"] * 1024,
        request_timeout=options["request-timeout"],
        idle_timeout=options["idle-timeout"],
        header_timeout=options["header-timeout"],
        max_connections=max_connections,
    )
    site = ServingSite(
        app.resource(),
        settings,
        metrics,
        worker=index,
        trust_proxy=bool(options["trust-proxy"]),
        access_log=access_log,
    )
    # Stopping waits for the requests in flight before the thread pool stops.
    threads.drained = lambda: site.drain(clock, DRAIN_SECONDS)
    if worker is not None:
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            metrics.share(directory)
        serve_inherited(worker, site, top, IReactorSocket(reactor), clock)
    else:
        endpoints = listen(options["listen"], site, top, clock)
        if options["workers"] > 1:
            if options.arguments is None:
                raise ValueError("worker processes need options parsed by parseOptions")
            WorkerPool(
                options["workers"] - 1,
                options.arguments,
                endpoints,
                metrics,
                IReactorProcess(reactor),
                clock,
            ).setServiceParent(top)
    log.info("serving {root} on {listen}", root=str(root.root), listen=", ".join(options["listen"]))
    return top
