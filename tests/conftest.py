"""Shared fixtures: demo datasets on disk, and the real server on a real port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool

from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.tools.demo import write_demo
from neurotrale_twisted.web.app import Neurotrale
from neurotrale_twisted.web.cors import CorsPolicy
from neurotrale_twisted.web.site import HttpSettings, NeurotraleSite


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the demo dataset, shared read-only by the tests that only read."""
    root = tmp_path_factory.mktemp("demo-root")
    write_demo(root)
    return root


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A fresh data root with the demo dataset, for tests that write or change files."""
    root = tmp_path / "data"
    root.mkdir()
    write_demo(root)
    return root


@dataclass
class RunningServer:
    """A server listening on 127.0.0.1: its URL, its application and its data root."""

    url: str
    app: Neurotrale
    root: Path
    port: IListeningPort
    pool: ThreadPool
    settings: HttpSettings = field(default_factory=HttpSettings)


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start the real application on a free port; everything started is stopped afterwards."""
    started: list[RunningServer] = []

    def start(
        root: Path,
        *,
        follow_symlinks: bool = False,
        keep_versions: int = 20,
        cors: tuple[str, ...] = ("*",),
        threads: int = 8,
        cache_bytes: int = 32 * 1024 * 1024,
        read_only: bool = False,
        htpasswd: str | None = None,
        auth_reads: bool = False,
        **http_settings: Any,
    ) -> RunningServer:
        pool = ThreadPool(minthreads=0, maxthreads=threads, name="test-pool")
        pool.start()
        policy = CorsPolicy(cors)
        app = Neurotrale(
            DataRoot(root, follow_symlinks=follow_symlinks),
            pool,
            reactor,
            keep_versions=keep_versions,
            cors=policy,
            cache_bytes=cache_bytes,
            read_only=read_only,
            htpasswd=htpasswd,
            auth_reads=auth_reads,
        )
        settings = HttpSettings(cors=policy, **http_settings)
        site = NeurotraleSite(app.resource(), settings)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"
        server = RunningServer(url, app, root, port, pool, settings)
        started.append(server)
        return server

    yield start
    for server in started:
        pytest_twisted.blockon(server.port.stopListening())
        server.pool.stop()


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted while the test runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def demo_server(serve: Callable[..., RunningServer], demo_root: Path) -> RunningServer:
    """The server on the shared, read-only demo root."""
    return serve(demo_root)
