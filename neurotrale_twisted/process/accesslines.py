"""A worker's access log on its way to the parent, in batches, without a JSON event a line.

A worker's log reaches the parent as JSON events on the worker's stdout, one a line, which
the parent parses and publishes (:mod:`neurotrale_twisted.process.workers`). For the access
log, a line a request, that cost as much as a tenth of a warm chunk's: here a worker holds
its access-log lines back for at most :data:`HOLD_SECONDS` (or :data:`HOLD_BYTES`) and writes
them in one go on the same stdout, each as ``A <time> <line>``; a JSON event never starts
with ``A``. The parent turns each back into the access event the parent's own lines are
(:func:`neurotrale_twisted.web.serving.access_event`), with the worker's time.

A worker killed with ``SIGKILL`` loses the lines it held (at most :data:`HOLD_SECONDS` of
them); a worker that stops writes them out first.
"""

from __future__ import annotations

from typing import TextIO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogEvent

from neurotrale_twisted.web.serving import access_event

#: How long a worker holds its access-log lines back, at most.
HOLD_SECONDS = 0.1
#: How much of them it holds, at most (the lines are written out when there is more).
HOLD_BYTES = 32 * 1024
#: What starts a batched access-log line on a worker's stdout.
PREFIX = b"A "


class BatchedAccessLog:
    """A worker's access log (an ``HTTPFactory.logFile``): lines written to ``out`` in
    batches, for the parent to decode with :func:`decode`."""

    def __init__(self, out: TextIO, clock: IReactorTime) -> None:
        self.out = out
        self.clock = clock
        self._held: list[str] = []
        self._size = 0
        self._flush: IDelayedCall | None = None
        self._closed = False

    def write(self, data: str, /) -> object:
        """Hold one line (``\\n``-terminated), stamped with the time now."""
        line = f"A {self.clock.seconds():.6f} {data.rstrip(chr(10)).replace(chr(10), ' ')}\n"
        self._held.append(line)
        self._size += len(line)
        if self._closed or self._size >= HOLD_BYTES:
            self.flush()
        elif self._flush is None:
            self._flush = self.clock.callLater(HOLD_SECONDS, self.flush)
        return None

    def flush(self) -> None:
        """Write out the lines held, in one write."""
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        if not self._held:
            return
        text = "".join(self._held)
        self._held, self._size = [], 0
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        """Write out the lines held; any later line is written at once."""
        self._closed = True
        self.flush()


def decode(line: bytes) -> LogEvent | None:
    """The access event of a line :class:`BatchedAccessLog` wrote, or None for another line."""
    if not line.startswith(PREFIX):
        return None
    stamp, _, text = line[len(PREFIX) :].partition(b" ")
    try:
        when = float(stamp)
    except ValueError:
        return None
    return access_event(text.decode("utf-8", "replace"), when)
