"""Cached chunks answered on the reactor's thread, while the file system answers fast.

A chunk whose files are unchanged since its answer was cached is found with a few ``stat``
calls (:meth:`~neurotrale_twisted.core.chunks.source.ChunkSource.respond_known`): about
10 µs on a local disk, against a hand-off to the thread pool and back that costs more than
everything else such a request does. Done on the reactor's thread, a slow file system would
hold up every connection of the process, so each look is timed: one slower than
:data:`SLOW_LOOK` sends every look to the thread pool for :data:`PAUSE` seconds (logged
once each time). A file system that hangs outright hangs the first look; the thread pool
would hang in the same way, with the reactor answering nothing useful meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.core.chunks.source import ChunkResponse, ChunkSource

log = Logger()

#: A look at a chunk's files slower than this (seconds) moves the looks off the reactor.
SLOW_LOOK = 0.002
#: For this long (seconds).
PAUSE = 10.0


class ReactorHits:
    """The cached answers of :class:`ChunkSource` looked up on the reactor's thread."""

    def __init__(
        self,
        chunks: ChunkSource,
        clock: IReactorTime,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.chunks = chunks
        self.clock = clock
        self.timer = timer
        #: Until when (``clock`` seconds) the looks are left to the thread pool.
        self.paused_until = 0.0

    def answer(
        self,
        dataset: list[str],
        key: str,
        name: ChunkName,
        coding: str | None,
        client_has: Callable[[str], bool] | None,
    ) -> ChunkResponse | None:
        """The cached answer for unchanged files, or None: then the thread pool answers."""
        if self.clock.seconds() < self.paused_until:
            return None
        started = self.timer()
        try:
            return self.chunks.respond_known(dataset, key, name, coding, client_has)
        finally:
            took = self.timer() - started
            if took > SLOW_LOOK:
                self.paused_until = self.clock.seconds() + PAUSE
                log.warn(
                    "looking at a chunk's files took {ms:.1f} ms: cached chunks are looked "
                    "up on the thread pool for the next {pause:g} s",
                    ms=took * 1000,
                    pause=PAUSE,
                )
