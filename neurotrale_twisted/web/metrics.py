"""The server's Prometheus metrics, one set per process, aggregated across worker processes.

A single process keeps its metrics in memory. With ``--workers N`` every process writes its
values to files in one temporary directory per server (prometheus_client's multiprocess
mode), and ``GET /metrics`` in any process reads them all: counters and histograms are summed
over every process that ever served (totals survive a worker's restart), the in-flight gauge
over the live ones.

Pure Python, no Twisted: the HTTP layer calls :meth:`ServerMetrics.request_finished`, and
the chunk source (``chunks.source.ChunkSource``, whose ``ChunkObserver`` this is)
:meth:`ServerMetrics.chunk_decoded` and :meth:`ServerMetrics.chunk_cache`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from neurotrale_twisted.core.annotations.records import ANNOTATION_NAME
from neurotrale_twisted.core.chunks.names import CHUNK_PATTERN

#: The environment variable that puts prometheus_client in multiprocess mode.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The Content-Type of the text exposition format.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DECODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "POST"})
_CHUNK_SEGMENT = re.compile(CHUNK_PATTERN)


def route_of(path: bytes) -> str:
    """The route a request path belongs to, as a metrics label from a small fixed set.

    ``index``, ``chunk``, ``annotation``, ``healthz``, ``metrics``, ``api`` or ``static``
    (any other file or directory). Labels never hold the path itself, so the number of
    series stays bounded whatever clients ask for.
    """
    segments = [s for s in path.split(b"?", 1)[0].split(b"/") if s]
    if not segments or segments == [b"index.html"]:
        return "index"
    if len(segments) == 1 and segments[0] in (b"healthz", b"metrics"):
        return segments[0].decode()
    if segments[0] == b"api":
        return "api"
    if (
        len(segments) >= 4
        and segments[-3] == b"annotations"
        and ANNOTATION_NAME.match(unquote_to_bytes(segments[-1]).decode("utf-8", "replace"))
    ):
        return "annotation"
    if len(segments) >= 3 and _CHUNK_SEGMENT.fullmatch(segments[-1].decode("latin-1")):
        return "chunk"
    return "static"


@dataclass
class _Instruments:
    requests: Counter
    response_bytes: Counter
    latency: Histogram
    in_flight: Gauge
    decode: Histogram
    cache_hits: Counter
    cache_misses: Counter
    worker_restarts: Counter
    commit_retries: Counter


def _instruments(registry: CollectorRegistry | None) -> _Instruments:
    return _Instruments(
        requests=Counter(
            "neurotrale_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        ),
        response_bytes=Counter(
            "neurotrale_http_response_bytes",
            "Response body bytes sent (after content encoding), by route.",
            ["route"],
            registry=registry,
        ),
        latency=Histogram(
            "neurotrale_http_request_duration_seconds",
            "Time from a request's headers to the end of its answer, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        in_flight=Gauge(
            "neurotrale_http_requests_in_flight",
            "Requests being answered now.",
            registry=registry,
            multiprocess_mode="livesum",
        ),
        decode=Histogram(
            "neurotrale_chunk_decode_seconds",
            "Time to read and decode one chunk's TIFF file into raw bytes.",
            buckets=_DECODE_BUCKETS,
            registry=registry,
        ),
        cache_hits=Counter(
            "neurotrale_chunk_cache_hits",
            "Chunks answered from the chunk cache without decoding.",
            registry=registry,
        ),
        cache_misses=Counter(
            "neurotrale_chunk_cache_misses",
            "Chunks looked up in the chunk cache and not found there.",
            registry=registry,
        ),
        worker_restarts=Counter(
            "neurotrale_worker_restarts",
            "Worker processes that exited while the server was running (each is restarted).",
            registry=registry,
        ),
        commit_retries=Counter(
            "neurotrale_annotation_commit_retries",
            "Annotation commits that lost the race for their number to another writer (on any "
            "host) and were re-read and re-applied.",
            registry=registry,
        ),
    )


class ServerMetrics:
    """The metrics of one server process, and their exposition for ``GET /metrics``.

    Created in memory; :meth:`share` moves them to a directory shared with the other worker
    processes before the server starts answering.
    """

    def __init__(self) -> None:
        self.directory: str | None = None
        self._registry: CollectorRegistry | None = CollectorRegistry()
        self._m = _instruments(self._registry)

    def share(self, directory: str) -> None:
        """Keep this process's values in ``directory``, where every worker's are aggregated.

        Call it before the first request: values recorded earlier are dropped.
        """
        os.environ[MULTIPROCESS_ENV] = directory
        if not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client picks its value storage when it is first imported; the
            # directory is only known once the server starts, so pick again now.
            values.ValueClass = values.get_value_class()
        self.directory = directory
        self._registry = None
        self._m = _instruments(None)

    # --- recording ------------------------------------------------------------------------

    def request_started(self) -> None:
        """A request's headers arrived and it is being answered."""
        self._m.in_flight.inc()

    def request_finished(
        self, route: str, method: str, status: int, sent_bytes: int, seconds: float
    ) -> None:
        """A request was answered (or its client went away) after ``seconds``."""
        m = self._m
        m.in_flight.dec()
        method = method if method in _METHODS else "other"
        m.requests.labels(route, method, str(status)).inc()
        m.response_bytes.labels(route).inc(sent_bytes)
        m.latency.labels(route).observe(seconds)

    def chunk_decoded(self, seconds: float) -> None:
        """A chunk's TIFF file was read and decoded in ``seconds`` (on a worker thread)."""
        self._m.decode.observe(seconds)

    def chunk_cache(self, hit: bool) -> None:
        """Count one lookup in the chunk response cache that hit (True) or missed (False)."""
        (self._m.cache_hits if hit else self._m.cache_misses).inc()

    def worker_restarted(self) -> None:
        """A worker process exited while the server ran (counted by the parent process)."""
        self._m.worker_restarts.inc()

    def commit_retried(self) -> None:
        """An annotation write lost its commit to another writer and tries again."""
        self._m.commit_retries.inc()

    # --- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """Every metric in the Prometheus text format, summed over all worker processes.

        Reads the shared directory in multiprocess mode: call it off the reactor thread.
        """
        if self.directory is None:
            assert self._registry is not None
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)
        return generate_latest(registry)

    @staticmethod
    def process_exited(directory: str, pid: int) -> None:
        """Forget the live gauges of a process that exited (its counters are kept)."""
        multiprocess.mark_process_dead(pid, directory)
