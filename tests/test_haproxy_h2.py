"""HTTP/2 for browsers: Debian's real haproxy run with contrib/haproxy/h2.cfg (TLS, ALPN
``h2,http/1.1``) in front of two workers, and a real HTTP/2 client (httpx with h2)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from .support import raw_of
from .test_e2e import Twistd
from .test_systemd import free_port
from .test_workers import wait_for

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "contrib" / "haproxy" / "h2.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY) and not os.environ.get("CI"),
    reason="haproxy is not installed (apt-get install haproxy)",
)
CHUNKS = [f"/demo-brain/1_1_1/{x}-{x + 64}_{y}-{y + 64}_0-32" for x in (0, 64) for y in (0, 64)]


@pytest.fixture
def tls_proxy(data_root: Path, tmp_path: Path) -> Iterator[tuple[str, Path, Twistd]]:
    """The server (two workers) behind haproxy with h2.cfg; its URL and the certificate."""
    cert, key, pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "haproxy.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    server = Twistd(data_root, tmp_path / "server.log", "--trust-proxy", workers=2)
    port = free_port()
    env = {
        **os.environ,
        "NEUROTRALE_SERVER": server.url.removeprefix("http://"),
        "NEUROTRALE_PROXY_BIND": f"127.0.0.1:{port}",
        "NEUROTRALE_TLS_PEM": str(pem),
    }
    log = (tmp_path / "haproxy.log").open("wb")
    proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=log)
    url = f"https://localhost:{port}"
    context = ssl.create_default_context(cafile=str(cert))

    def answers() -> bool:
        try:
            return httpx.get(url + "/healthz", verify=context).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, 15, "haproxy to answer over TLS")
        yield url, cert, server
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        log.close()
        server.stop()


def expected(root: Path, chunk: str) -> bytes:
    return raw_of(tifffile.imread(root / (chunk.lstrip("/") + ".tiff"))[np.newaxis])


def test_chunks_over_one_http2_connection(
    tls_proxy: tuple[str, Path, Twistd], data_root: Path
) -> None:
    url, cert, _ = tls_proxy
    context = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(http2=True, verify=context) as client:
        for chunk in CHUNKS:
            for encoding in ("identity", "gzip, deflate, br, zstd"):
                response = client.get(url + chunk, headers={"Accept-Encoding": encoding})
                assert response.http_version == "HTTP/2"
                assert response.status_code == 200
                assert response.headers["content-type"] == "application/octet-stream"
                if encoding != "identity":
                    assert response.headers["content-encoding"] == "zstd"
                assert response.content == expected(data_root, chunk)  # decoded by httpx
        missing = client.get(url + "/demo-brain/1_1_1/0-64_0-64_64-96")
        assert (missing.http_version, missing.status_code) == ("HTTP/2", 404)
        assert missing.json()["status"] == 404
    # A client without HTTP/2 still gets HTTP/1.1 from the same port (ALPN fallback).
    with httpx.Client(http2=False, verify=context) as client:
        response = client.get(url + CHUNKS[0])
        assert (response.http_version, response.status_code) == ("HTTP/1.1", 200)
        assert response.content == expected(data_root, CHUNKS[0])


def test_many_streams_in_flight_on_one_connection(
    tls_proxy: tuple[str, Path, Twistd], data_root: Path
) -> None:
    """Like Neuroglancer: dozens of chunk requests at once, all on one HTTP/2 connection."""
    import asyncio

    url, cert, _ = tls_proxy
    context = ssl.create_default_context(cafile=str(cert))

    async def view() -> list[httpx.Response]:
        async with httpx.AsyncClient(http2=True, verify=context) as client:
            return await asyncio.gather(*(client.get(url + c) for c in CHUNKS * 10))

    responses = asyncio.run(view())
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert [r.status_code for r in responses] == [200] * len(CHUNKS) * 10
    for response, chunk in zip(responses, CHUNKS * 10, strict=True):
        assert response.content == expected(data_root, chunk)
