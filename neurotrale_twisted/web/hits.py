"""Cached chunks answered on the reactor's thread, while the file system answers fast.

A chunk whose files are unchanged since its answer was cached is found with a few ``stat``
calls (:meth:`~neurotrale_twisted.core.chunks.source.ChunkSource.respond_known`): about
10 µs on a local disk, against a hand-off to the thread pool and back that costs more than
everything else such a request does. Done on the reactor's thread, a slow file system
would hold up every connection of the process, so each look is timed: when the looks take
:data:`SLOW_LOOKS` on average (a moving average: a single look can wait a few milliseconds
for the interpreter lock while a decoding thread holds it), or one takes :data:`STALLED_LOOK`,
every look goes to the thread pool for :data:`PAUSE` seconds (logged each time).

A file system that hangs outright hangs the first look, and with it the process's reactor:
its connections, ``/healthz`` and ``/metrics``. On the thread pool it would have hung a
thread for each request to it, and the process's chunk and annotation answers once the
threads were all taken, while ``/healthz`` answered 503 in 5 s. The parent of a worker pool
relays its workers' logs, and a worker blocks once its log pipe is full, so a parent's hung
reactor would stop the whole pool: a parent of workers never looks here (``enabled``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.core.chunks.source import ChunkResponse, ChunkSource

log = Logger()

#: Looks slower than this on average (seconds) move the looks off the reactor.
SLOW_LOOKS = 0.002
#: As does one look slower than this.
STALLED_LOOK = 0.05
#: For this long (seconds).
PAUSE = 10.0
#: The weight of the newest look in the moving average.
WEIGHT = 0.1


class ReactorHits:
    """The cached answers of :class:`ChunkSource` looked up on the reactor's thread."""

    def __init__(
        self,
        chunks: ChunkSource,
        clock: IReactorTime,
        timer: Callable[[], float] = time.perf_counter,
        *,
        enabled: bool = True,
    ) -> None:
        self.chunks = chunks
        self.clock = clock
        self.timer = timer
        self.enabled = enabled
        #: Until when (``clock`` seconds) the looks are left to the thread pool.
        self.paused_until = 0.0
        #: The moving average of the looks' durations, in seconds.
        self.average = 0.0

    def answer(
        self,
        dataset: list[str],
        key: str,
        name: ChunkName,
        coding: str | None,
        client_has: Callable[[str], bool] | None,
    ) -> ChunkResponse | None:
        """The cached answer for unchanged files, or None: then the thread pool answers."""
        if not self.enabled or self.clock.seconds() < self.paused_until:
            return None
        started = self.timer()
        try:
            return self.chunks.respond_known(dataset, key, name, coding, client_has)
        finally:
            took = self.timer() - started
            self.average += WEIGHT * (took - self.average)
            if took > STALLED_LOOK or self.average > SLOW_LOOKS:
                self.paused_until = self.clock.seconds() + PAUSE
                log.warn(
                    "looking at a chunk's files took {ms:.1f} ms ({average:.1f} ms on "
                    "average): cached chunks are looked up on the thread pool for the next "
                    "{pause:g} s",
                    ms=took * 1000,
                    average=self.average * 1000,
                    pause=PAUSE,
                )
                self.average = 0.0
