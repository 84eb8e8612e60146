"""The server behind Debian's real haproxy, run with contrib/haproxy/haproxy.cfg (the file
docker-compose.yml mounts), the server address templated to the test's port."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_e2e import Twistd
from .test_systemd import free_port
from .test_workers import wait_for, worker_pid

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "contrib" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY) and not os.environ.get("CI"),
    reason="haproxy is not installed (apt-get install haproxy)",
)
#: Clients connect to haproxy from this loopback address, so that the server can tell
#: the client (127.0.0.2) from haproxy (127.0.0.1).
CLIENT = "127.0.0.2"


class Proxy:
    """haproxy in front of ``server``, listening on a free port."""

    def __init__(self, server_url: str, log: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "NEUROTRALE_SERVER": server_url.removeprefix("http://"),
            "NEUROTRALE_PROXY_BIND": f"127.0.0.1:{self.port}",
        }
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=self.log, stderr=self.log
        )
        wait_for(self._accepts, 15, "haproxy to listen")

    def _accepts(self) -> bool:
        try:
            self.request("GET", "/data/healthz")
        except OSError:
            return False
        return True

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=30, source_address=(CLIENT, 0)
        )
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, answer.headers, answer.read()
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(params=[True, False], ids=["trust-proxy", "no-trust"])
def proxied(
    request: pytest.FixtureRequest, data_root: Path, tmp_path: Path
) -> Iterator[tuple[Proxy, Twistd, bool]]:
    trust = bool(request.param)
    args = ["--trust-proxy"] if trust else []
    server = Twistd(data_root, tmp_path / "server.log", *args, workers=2 if trust else 1)
    proxy = Proxy(server.url, tmp_path / "haproxy.log")
    try:
        yield proxy, server, trust
    finally:
        proxy.stop()
        server.stop()


def direct(server: Twistd, path: str) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path)
    return connection.getresponse().read()


def test_requests_through_haproxy(proxied: tuple[Proxy, Twistd, bool]) -> None:
    proxy, server, trust = proxied
    status, headers, body = proxy.request("GET", "/data/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")

    # The index's links are relative: followed from /data/ they stay behind the prefix.
    status, headers, body = proxy.request("GET", "/data/")
    link = re.search(rb'<a href="([^"]+)">demo-brain</a>', body)
    assert status == 200 and link is not None
    status, _, _ = proxy.request("GET", "/data/" + link.group(1).decode() + "info")
    assert status == 200

    status, headers, body = proxy.request("GET", "/data/demo-brain/info")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["data_type"] == "uint16"

    chunk = "/demo-brain/1_1_1/64-128_64-128_32-64"
    status, headers, body = proxy.request("GET", "/data" + chunk)
    assert status == 200
    assert body == direct(server, chunk) and len(body) == 64 * 64 * 32 * 2
    status, headers, body = proxy.request(
        "GET", "/data" + chunk, headers={"Accept-Encoding": "gzip"}
    )
    assert (status, headers["Content-Encoding"], headers["Vary"]) == (
        200,
        "gzip",
        "Accept-Encoding",
    )
    assert proxy.request("GET", "/data/demo-brain/1_1_1/0-64_0-64_64-96")[0] == 404

    # The viewer's write: a preflight, then PUT of the whole file as text/plain.
    url = "/data/demo-brain/annotations/x0y0z0/z-0003.json"
    status, headers, _ = proxy.request(
        "OPTIONS",
        url,
        headers={
            "Origin": "https://viewer.example",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    records = [{"point": [1, 2, 3], "type": "point", "id": "a1", "anntype": "neuron"}]
    status, headers, body = proxy.request(
        "PUT",
        url,
        body=json.dumps(records).encode(),
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://viewer.example"},
    )
    assert (status, json.loads(body)["count"]) == (201, 1)
    patch = {"point": [4, 5, 6], "type": "point", "id": "b2", "anntype": "glia"}
    status, _, body = proxy.request("PATCH", url + "?id=b2", body=json.dumps(patch).encode())
    assert (status, json.loads(body)) == (200, {"id": "b2"})
    status, headers, body = proxy.request("GET", url)
    assert status == 200
    assert [r["id"] for r in json.loads(body)] == ["a1", "b2"]
    stored = server.log.parent / "data" / "demo-brain" / "annotations" / "x0y0z0" / "z-0003.json"
    assert [r["id"] for r in json.loads(stored.read_text())] == ["a1", "b2"]

    # Only /data/ reaches the server.
    status, _, body = proxy.request("GET", "/demo-brain/info")
    assert (status, json.loads(body)) == (404, {"error": "not found", "status": 404})
    status, headers, _ = proxy.request("GET", "/data")
    assert (status, headers["Location"]) == (301, "/data/")

    # The access log: the client haproxy saw (127.0.0.2) only when the proxy is trusted;
    # what the client itself claims in X-Forwarded-For never counts.
    agent = f"access-log-probe-{time.monotonic_ns()}"
    status, headers, _ = proxy.request(
        "GET",
        "/data/demo-brain/info",
        headers={"User-Agent": agent, "X-Forwarded-For": "6.6.6.6"},
    )
    assert status == 200 and worker_pid(headers)

    def logged() -> Any:
        return re.search(
            rf'"([^"]+)" - - \[[^]]+\] "GET /demo-brain/info HTTP/1\.1" 200 \d+ "-" "{agent}"',
            server.log.read_text(),
        )

    line = wait_for(logged, 10, "the access log line")
    assert line.group(1) == (CLIENT if trust else "127.0.0.1")
    assert "6.6.6.6" not in line.group(0)
