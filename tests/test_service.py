"""The ``twistd neurotrale`` options and the service they build (no server started)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.application import internet
from twisted.internet import reactor
from twisted.python import usage

from neurotrale_twisted.core.cpus import usable_cpus
from neurotrale_twisted.process.options import DEFAULT_LISTEN, Options
from neurotrale_twisted.process.service import ThreadPoolService, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECOMPUTED_PATH", str(tmp_path))
    options = parse()
    assert options["path"] == str(tmp_path)
    assert options["listen"] == [DEFAULT_LISTEN] == ["tcp:9000"]
    assert options["workers"] == usable_cpus()
    assert options["keep-versions"] == 20
    assert options["cors-origin"] == []
    assert not options["follow-symlinks"]


def test_path_option_beats_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECOMPUTED_PATH", "/nonexistent")
    assert parse("--path", str(tmp_path))["path"] == str(tmp_path)
    assert parse("-p", str(tmp_path))["path"] == str(tmp_path)


def test_default_root_is_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRECOMPUTED_PATH", raising=False)
    if os.path.isdir("/data"):
        pytest.skip("this machine has a /data directory")
    with pytest.raises(usage.UsageError, match="'/data' is not a directory"):
        parse()


def test_refuses_a_root_that_is_not_a_readable_directory(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="is not a directory"):
        parse("--path", str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(usage.UsageError, match="is not a directory"):
        parse("--path", str(tmp_path / "file"))
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        with pytest.raises(usage.UsageError, match="is not readable"):
            parse("--path", str(locked))


def test_listen_and_port(tmp_path: Path) -> None:
    options = parse(
        "--path",
        str(tmp_path),
        "--listen",
        "tcp:8001:interface=127.0.0.1",
        "--listen",
        "unix:/tmp/x.sock",
        "--port",
        "8002",
    )
    assert options["listen"] == ["tcp:8001:interface=127.0.0.1", "unix:/tmp/x.sock", "tcp:8002"]
    assert parse("--path", str(tmp_path), "--port", "8003")["listen"] == ["tcp:8003"]


def test_bad_numbers_are_refused(tmp_path: Path) -> None:
    for args in (
        ["--workers", "0"],
        ["--port", "x"],
        ["--max-body", "-1"],
        ["--keep-versions", "-2"],
    ):
        with pytest.raises(usage.UsageError):
            parse("--path", str(tmp_path), *args)


def test_make_service_has_a_pool_and_one_listener_per_endpoint(tmp_path: Path) -> None:
    options = parse(
        "--path",
        str(tmp_path),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        f"unix:{tmp_path}/s.sock",
        "--cors-origin",
        "https://a.example",
    )
    top = makeService(options, reactor)
    services = list(top)
    assert sum(isinstance(s, ThreadPoolService) for s in services) == 1
    listeners = [s for s in services if isinstance(s, internet.StreamServerEndpointService)]
    assert len(listeners) == 2


def test_workers_and_trust_proxy(tmp_path: Path) -> None:
    from neurotrale_twisted.process.workers import WorkerPool
    from neurotrale_twisted.web.serving import ServingSite, trusted_proxy_log_formatter

    options = parse("--path", str(tmp_path), "--workers", "4", "--trust-proxy")
    assert options["trust-proxy"]
    pools = [s for s in makeService(options, reactor) if isinstance(s, WorkerPool)]
    assert len(pools) == 1 and pools[0].count == 3
    single = parse("--path", str(tmp_path), "--workers", "1")
    assert not single["trust-proxy"]
    services = list(makeService(single, reactor))
    assert not any(isinstance(s, WorkerPool) for s in services)
    listener = next(s for s in services if isinstance(s, internet.StreamServerEndpointService))
    assert isinstance(listener.factory, ServingSite)
    assert listener.factory._logFormatter is not trusted_proxy_log_formatter


def test_only_a_parent_of_workers_never_looks_at_files_on_its_reactor(tmp_path: Path) -> None:
    """The parent relays its workers' logs (a worker blocks once its pipe is full): its
    reactor must never wait on a hung file system, so its cached chunks are looked up on
    the thread pool. A single process and each worker look on the reactor."""
    from neurotrale_twisted.process.adopted import Inherited
    from neurotrale_twisted.web.app import ChunkRoutes

    def hits_enabled(top: Any) -> bool:
        listener = next(s for s in top if isinstance(s, internet.StreamServerEndpointService))
        routes = listener.factory.resource.routes
        assert isinstance(routes, ChunkRoutes)
        return bool(routes.app.hits.enabled)

    path = str(tmp_path)
    assert not hits_enabled(makeService(parse("--path", path, "--workers", "2"), reactor))
    assert hits_enabled(makeService(parse("--path", path, "--workers", "1"), reactor))
    worker = Inherited.from_json('{"index": 1, "sockets": [{"fd": 3, "family": "INET"}]}')
    assert hits_enabled(makeService(parse("--path", path, "--workers", "1"), reactor, worker))


def test_what_the_core_logs_reaches_the_servers_log(
    tmp_path: Path, logged: list[dict[str, object]]
) -> None:
    """The core logs through the standard library (it knows nothing of Twisted); once the
    service is built, its warnings are Twisted log events in the core module's namespace,
    written where the server's own lines are."""
    import logging

    from twisted.logger import LogLevel, formatEvent

    makeService(parse("--path", str(tmp_path), "--workers", "1"), reactor)
    logging.getLogger("neurotrale_twisted.core.annotations.commitlog").warning(
        "went on without the lock of a file after %s s", 10.0
    )
    events = [e for e in logged if e.get("log_namespace", "").startswith("neurotrale_twisted.core")]
    assert [(e["log_namespace"], e["log_level"], formatEvent(e)) for e in events] == [
        (
            "neurotrale_twisted.core.annotations.commitlog",
            LogLevel.warn,
            "went on without the lock of a file after 10.0 s",
        )
    ]


def test_the_c_allocator_keeps_two_arenas() -> None:
    """glibc takes the limit (``mallopt`` answers 1); the memory it saves is measured in
    ``bench/views_bench.py`` (RSS per process after 100 connections)."""
    import platform

    from neurotrale_twisted.process.service import limit_malloc_arenas

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's M_ARENA_MAX is glibc's")
    assert limit_malloc_arenas()
