"""A worker's access log in batches (``process/accesslines.py``): held at most 0.1 s or
32 KiB, written whole, read back by the parent as the events its own lines are."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from neurotrale_twisted.process import accesslines
from neurotrale_twisted.process.accesslines import HOLD_BYTES, HOLD_SECONDS, BatchedAccessLog
from neurotrale_twisted.web.serving import ACCESS_NAMESPACE

LINE = (
    '"127.0.0.1" - - [04/Dec/2026:21:00:34 +0000] "GET /demo-brain/info HTTP/1.1" 200 1154 '
    '"-" "probe"'
)


class CountingOut(io.StringIO):
    """A stdout that counts its flushes (each batch is one write and one flush)."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_lines_are_held_then_written_in_one_go_with_their_time() -> None:
    clock, out = Clock(), CountingOut()
    access = BatchedAccessLog(out, clock)
    clock.advance(1000.25)
    access.write(LINE + "\n")
    clock.advance(0.05)
    access.write(LINE.replace("probe", "second") + "\n")
    assert out.getvalue() == ""
    clock.advance(HOLD_SECONDS)
    lines = out.getvalue().encode().splitlines()
    assert out.flushes == 1 and len(lines) == 2
    events = [accesslines.decode(line) for line in lines]
    assert [e["log_time"] for e in events if e] == [1000.25, 1000.3]
    first = events[0]
    assert first is not None and formatEvent(first) == LINE
    assert first["log_namespace"] == ACCESS_NAMESPACE and first["log_level"] == LogLevel.info


def test_a_full_batch_is_written_at_once_and_close_writes_the_rest() -> None:
    clock, out = Clock(), CountingOut()
    access = BatchedAccessLog(out, clock)
    count = 0
    while not out.flushes:
        access.write(LINE + "\n")
        count += 1
    # Written when the lines held reached HOLD_BYTES, not a line later, not before.
    assert len(out.getvalue()) >= HOLD_BYTES > len(out.getvalue()) - len(LINE) - 20
    assert len(out.getvalue().splitlines()) == count
    access.write(LINE + "\n")
    access.close()
    assert out.flushes == 2 and len(out.getvalue().splitlines()) == count + 1
    assert not clock.getDelayedCalls()  # nothing left to fire
    access.write(LINE + "\n")  # a request answered while the process stops
    assert out.flushes == 3


def test_only_batched_lines_decode() -> None:
    assert accesslines.decode(b'{"log_format": "x"}') is None
    assert accesslines.decode(b"A not-a-time text") is None
    event = accesslines.decode(b"A 12.5 caf\xc3\xa9 \xff")
    assert event is not None and formatEvent(event) == "caf\u00e9 \ufffd"
