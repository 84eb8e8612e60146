"""Operations: ``/healthz``, ``/metrics``, the worker header and the access log, in one process."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.python.threadpool import ThreadPool
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.web.app import Neurotrale
from neurotrale_twisted.web.metrics import ServerMetrics, route_of
from neurotrale_twisted.web.serving import (
    ServingSite,
    forwarded_client,
    trusted_proxy_log_formatter,
)
from neurotrale_twisted.web.site import HttpSettings

from .test_workers import metric


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Callable[[Path], tuple[str, ServingSite]]]:
    """Start the application behind a :class:`ServingSite` on a free port."""
    ports = []
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-serving")
    pool.start()

    def start(root: Path) -> tuple[str, ServingSite]:
        metrics = ServerMetrics()
        app = Neurotrale(DataRoot(root), pool, reactor, metrics=metrics)
        site = ServingSite(app.resource(), HttpSettings(), metrics, worker=0)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}", site

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())
    pool.stop()


def test_routes_are_a_small_fixed_set() -> None:
    assert route_of(b"/") == route_of(b"/index.html") == "index"
    assert route_of(b"/healthz") == "healthz"
    assert route_of(b"/metrics?x=1") == "metrics"
    assert route_of(b"/api/openapi.json") == "api"
    assert route_of(b"/lab/brain1/1_1_1/0-64_0-64_0-64") == "chunk"
    assert route_of(b"/brain1//1_1_1/0-64_0-64_0-64.tiff") == "chunk"
    assert route_of(b"/brain1/annotations/x0y0z0/fibers.json?id=a") == "annotation"
    assert route_of(b"/brain1/info") == route_of(b"/brain1/") == "static"


def test_forwarded_client_is_the_address_the_proxy_added() -> None:
    request = DummyRequest([b""])
    assert forwarded_client(request) is None
    request.requestHeaders = Headers({b"x-forwarded-for": [b"6.6.6.6, 10.0.0.1", b"203.0.113.7"]})
    assert forwarded_client(request) == IPv4Address("TCP", "203.0.113.7", 0)
    request.requestHeaders = Headers({b"x-forwarded-for": [b"2001:db8::1"]})
    assert forwarded_client(request).host == "2001:db8::1"  # type: ignore[union-attr]
    request.requestHeaders = Headers({b"x-forwarded-for": [b"<script>"]})
    assert forwarded_client(request) is None


def test_trusted_proxy_log_line() -> None:
    request = DummyRequest([b""])
    request.method = b"GET"
    request.uri = b"/brain1/info"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 12
    request.client = IPv4Address("TCP", "10.0.0.2", 5555)
    request.requestHeaders = Headers({b"x-forwarded-for": [b"198.51.100.4"]})
    line = trusted_proxy_log_formatter("[24/Nov/2026:21:00:00 +0000]", request)
    assert line == (
        '"198.51.100.4" - - [24/Nov/2026:21:00:00 +0000] "GET /brain1/info HTTP/1.1" 200 12 "-" "-"'
    )


@pytest_twisted.ensureDeferred
async def test_healthz_follows_the_data_root(
    serving: Callable[[Path], tuple[str, ServingSite]], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    url, site = serving(root)
    response = await treq.get(url + "/healthz")
    assert response.code == 200
    assert await response.json() == {"status": "ok", "detail": "the data root is readable"}
    site.draining = True  # the process is stopping: balancers should look elsewhere
    response = await treq.get(url + "/healthz")
    assert (response.code, (await response.json())["status"]) == (503, "stopping")
    site.draining = False
    shutil.rmtree(root)
    response = await treq.get(url + "/healthz")
    assert response.code == 503
    document = await response.json()
    assert document["status"] == "unavailable"
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_bytes_latency_and_decoding(
    serving: Callable[[Path], tuple[str, ServingSite]], demo_root: Path
) -> None:
    url, _ = serving(demo_root)
    chunk = await treq.get(url + "/demo-brain/1_1_1/0-64_0-64_0-32")
    body = await treq.content(chunk)
    assert chunk.headers.getRawHeaders("x-neurotrale-worker")[0].startswith("0; pid=")
    again = await treq.get(url + "/demo-brain/1_1_1/0-64_0-64_0-32")
    assert await treq.content(again) == body  # from the response cache
    missing = await treq.get(url + "/demo-brain/1_1_1/0-64_0-64_64-96")
    await treq.content(missing)
    assert missing.code == 404

    response = await treq.get(url + "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    text = (await treq.content(response)).decode()
    ok = 'neurotrale_http_requests_total{method="GET",route="chunk",status="200"}'
    assert metric(text, ok) == 2
    assert metric(text, ok.replace("200", "404")) == 1
    sent = metric(text, 'neurotrale_http_response_bytes_total{route="chunk"}')
    assert 0 < sent < 2 * (len(body) + 200)  # as sent: treq asked for gzip
    assert metric(text, 'neurotrale_http_request_duration_seconds_count{route="chunk"}') == 3
    assert metric(text, "neurotrale_chunk_decode_seconds_count") == 1
    assert metric(text, "neurotrale_chunk_cache_hits_total") == 1
    assert metric(text, "neurotrale_chunk_cache_misses_total") == 1
    assert metric(text, "neurotrale_http_requests_in_flight") == 1  # this request


def test_lines_logged_while_stopping_have_the_time_they_were_logged() -> None:
    """Twisted stops updating the access log's date with the ports; the answers sent during
    the drain after that are logged with their own time, not the time the ports stopped."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource

    class Lines:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, data: str, /) -> object:
            self.lines.append(data)
            return None

        def close(self) -> None:
            pass

    clock, lines = Clock(), Lines()
    clock.advance(1764892800)  # 2025-12-05 00:00:00 UTC
    site = ServingSite(Resource(), HttpSettings(), ServerMetrics(), access_log=lines, reactor=clock)
    site.startFactory()
    request = DummyRequest([b""])
    request.method, request.uri, request.clientproto = b"GET", b"/x", b"HTTP/1.1"
    request.code, request.sentLength = 200, 1
    request.client = IPv4Address("TCP", "10.0.0.2", 5555)
    site.log(request)
    site.stopFactory()
    clock.advance(7)
    site.log(request)
    assert "[05/Dec/2025:00:00:00 +0000]" in lines.lines[0]
    assert "[05/Dec/2025:00:00:07 +0000]" in lines.lines[1]
