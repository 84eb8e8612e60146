"""Protocol faults, each answered as RFC 9110/9112 asks, and the answers around authentication.

Requests that a client library would tidy up (a missing or doubled ``Host``, ``//`` paths,
``Expect: 100-continue``) go out on raw sockets.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import bcrypt
import numpy as np
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent

from neurotrale_twisted.web.site import NeurotraleSite
from tests.conftest import RunningServer
from tests.support import headers_of, raw_http, status_of, write_chunk, write_info
from tests.test_security import snapshot

FIBERS = "/demo-brain/annotations/x0y0z0/fibers.json"
CHUNK = "/demo-brain/1_1_1/0-64_0-64_0-32"
#: An absolute path in a message: a ``/`` that begins a word and has another ``/`` after it.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s/'\"]+/")


def _json(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


async def _raw(server: RunningServer, request: bytes) -> bytes:
    return await deferToThread(raw_http, server.port.getHost().port, request)


def _htpasswd(tmp_path: Path, cost: int = 5) -> Path:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"alice:" + bcrypt.hashpw(b"s3cret-pw", bcrypt.gensalt(cost)) + b"\n")
    return path


# --- authentication ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_is_never_behind_authentication(
    serve: Callable[..., RunningServer], data_root: Path, tmp_path: Path
) -> None:
    server = serve(data_root, htpasswd=str(_htpasswd(tmp_path)), auth_reads=True)
    for method in ("GET", "HEAD"):
        response = await treq.request(method, server.url + "/healthz")
        assert response.code == 200, method
    assert json.loads(await treq.content(await treq.get(server.url + "/healthz")))["status"] == "ok"
    # Everything else still needs credentials.
    assert (await treq.get(server.url + FIBERS)).code == 401
    assert (await treq.get(server.url + CHUNK)).code == 401
    assert (await treq.get(server.url + "/healthz/../" + FIBERS.lstrip("/"))).code == 401


@pytest_twisted.ensureDeferred
async def test_an_unknown_user_costs_a_bcrypt_check_like_a_wrong_password(
    serve: Callable[..., RunningServer],
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    server = serve(data_root, htpasswd=str(_htpasswd(tmp_path, cost=6)))
    before = snapshot(data_root)
    for user in ("mallory", "alice", "eve", "bob"):
        checked.clear()
        response = await treq.put(server.url + FIBERS, data=b"[]", auth=(user, "wrong-pw"))
        assert response.code == 401, user
        assert len(checked) == 1, (user, checked)
        assert checked[0].split(b"$")[2] == b"06", (user, checked)  # the entries' cost
    assert snapshot(data_root) == before
    ok = await treq.put(server.url + FIBERS, data=b"[]", auth=("alice", "s3cret-pw"))
    assert ok.code == 200


# --- request line and headers ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_host_is_required_once_in_http_1_1(demo_server: RunningServer) -> None:
    faults = [
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET " + CHUNK.encode() + b" HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:80x\r\nConnection: close\r\n\r\n",
    ]
    for request in faults:
        answer = await _raw(demo_server, request)
        assert status_of(answer) == 400, (request, answer[:300])
        assert _json(answer)["status"] == 400
    fine = [
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:9000\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ]
    for request in fine:
        assert status_of(await _raw(demo_server, request)) == 200, request


@pytest.fixture
def unix_socket() -> Iterator[str]:
    """A short socket path (the limit is about 100 bytes), removed afterwards."""
    directory = tempfile.mkdtemp(prefix="nt-", dir="/tmp")
    yield directory + "/http.sock"
    shutil.rmtree(directory, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_http_1_0_without_host_over_a_unix_socket(
    demo_server: RunningServer, unix_socket: str
) -> None:
    site = NeurotraleSite(demo_server.app.resource(), demo_server.settings)
    port = reactor.listenUNIX(unix_socket, site)
    try:
        for target, status in [
            ("/", 200),
            ("/healthz", 200),
            ("/demo-brain", 302),
            ("/demo-brain/", 200),
            (CHUNK, 200),
            (FIBERS, 200),
            ("/nothing-here", 404),
        ]:
            request = f"GET {target} HTTP/1.0\r\n\r\n".encode()
            answer = await deferToThread(raw_http, unix_socket, request)
            assert status_of(answer) == status, (target, answer[:300])
        index = await deferToThread(raw_http, unix_socket, b"GET / HTTP/1.0\r\n\r\n")
        assert b"precomputed://http://localhost/demo-brain" in index
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_100_continue_after_a_final_413(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root, max_body=1024)
    before = snapshot(data_root)
    request = (
        f"PUT {FIBERS} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    answer = await _raw(server, request)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"100 Continue" not in answer
    assert _json(answer)["status"] == 413
    # A body within the limit still gets its 100 Continue, then the final answer.
    small = (
        f"PUT {FIBERS} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n[]"
    ).encode()
    answer = await _raw(server, small)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), answer[:300]
    assert snapshot(data_root) != before


@pytest_twisted.ensureDeferred
async def test_double_slashes_never_redirect_to_another_host(demo_server: RunningServer) -> None:
    for target in [
        "//demo-brain",
        "///demo-brain",
        "//demo-brain//1_1_1",
        "//evil.example/demo-brain",
        "//demo-brain?x=1",
        "/demo-brain",
        "//api",
    ]:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        answer = await _raw(demo_server, request)
        status = status_of(answer)
        if target.startswith("//evil"):
            assert status == 404, answer[:300]
            continue
        assert status in (301, 302), (target, answer[:300])
        [location] = headers_of(answer)["location"]
        assert not location.startswith("//") and "://" not in location, (target, location)
        resolved = urlsplit(urljoin(f"http://x{target}", location))
        assert resolved.netloc == "x", (target, location)
        assert resolved.path.endswith("/"), (target, location)
        if "?" in target:
            assert resolved.query == "x=1"
        followed = await _raw(
            demo_server,
            f"GET {resolved.path}?{resolved.query} HTTP/1.1\r\nHost: x\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(followed) == 200, (target, location, followed[:300])


# --- query strings and names -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_huge_version_number_is_a_400(demo_server: RunningServer) -> None:
    for digits in (5000, 4301, 40):
        response = await treq.get(f"{demo_server.url}{FIBERS}?version={'7' * digits}")
        assert response.code == 400, digits
        assert json.loads(await treq.content(response))["status"] == 400


@pytest_twisted.ensureDeferred
async def test_query_values_that_are_not_utf8_are_400s(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    before = snapshot(data_root)
    point = b'{"type":"point","point":[1,2,3]}'
    for method, query, body in [
        ("PATCH", "id=%ff", point),
        ("PATCH", "id=a%ff", b'{"id":"a\\ufffd","type":"point","point":[1,2,3]}'),
        ("PATCH", "id=%c0%ae", point),
        ("DELETE", "id=%ff", b""),
        ("DELETE", "id=%ed%a0%80", b""),
        ("GET", "version=%ff", b""),
        ("PUT", "id=%fe", b"[]"),
    ]:
        response = await treq.request(method, f"{server.url}{FIBERS}?{query}", data=body)
        document = json.loads(await treq.content(response))
        assert response.code == 400, (method, query, document)
        assert document["status"] == 400 and "UTF-8" in document["error"], document
    assert snapshot(data_root) == before
    assert "\ufffd" not in (data_root / FIBERS.lstrip("/")).read_text()


@pytest_twisted.ensureDeferred
async def test_chunk_names_are_ascii_digits_only(demo_server: RunningServer) -> None:
    assert (await treq.get(demo_server.url + CHUNK)).code == 200
    for alias in [
        "%D9%A0-64_0-64_0-32",  # ARABIC-INDIC DIGIT ZERO
        "%EF%BC%90-64_0-64_0-32",  # FULLWIDTH DIGIT ZERO
        "0-%E0%A5%AC%E0%A5%AA_0-64_0-32",  # DEVANAGARI 64
        "0-64_0-64_0-%F0%9D%9F%91%F0%9D%9F%90",  # MATHEMATICAL BOLD 32
    ]:
        response = await treq.get(f"{demo_server.url}/demo-brain/1_1_1/{alias}")
        assert response.code == 404, alias
        assert json.loads(await treq.content(response))["status"] == 404


# --- error bodies ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_error_bodies_never_name_an_absolute_path(
    serve: Callable[..., RunningServer], tmp_path: Path, logged: list[dict[str, Any]]
) -> None:
    root = tmp_path / "root"
    volume = np.arange(2 * 8 * 8, dtype="uint16").reshape(2, 8, 8)
    write_info(root / "bad", (8, 8, 4))
    garbage = write_chunk(root / "bad", "1_1_1", (0, 8, 0, 8, 0, 2), volume)
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    write_chunk(root / "bad", "1_1_1", (0, 8, 0, 8, 2, 4), volume.astype("uint8"))
    write_info(root / "wrongtype", (8, 8, 2), dtype="float99")
    write_chunk(root / "wrongtype", "1_1_1", (0, 8, 0, 8, 0, 2), volume)
    (root / "brokeninfo").mkdir()
    (root / "brokeninfo" / "info").write_text("{not json")
    (root / "listinfo").mkdir()
    (root / "listinfo" / "info").write_text("[]")
    server = serve(root)
    answers = []
    for target in [
        "/bad/1_1_1/0-8_0-8_0-2",
        "/bad/1_1_1/0-8_0-8_2-4",
        "/wrongtype/1_1_1/0-8_0-8_0-2",
        "/brokeninfo/1_1_1/0-8_0-8_0-2",
        "/listinfo/1_1_1/0-8_0-8_0-2",
        "/bad/annotations/x0y0z0/a.json",
        "/nothing/1_1_1/0-8_0-8_0-2",
    ]:
        for accept in ("", "gzip"):
            response = await treq.get(server.url + target, headers={"Accept-Encoding": accept})
            document = json.loads(await treq.content(response))
            assert document == {"error": document["error"], "status": response.code}
            answers.append((target, response.code, document["error"]))
    assert [code for _, code, _ in answers][:10] == [500] * 10, answers
    for target, _, message in answers:
        assert str(tmp_path) not in message and ABSOLUTE_PATH.search(message) is None, (
            target,
            message,
        )
    decoded = [m for t, _, m in answers if t == "/bad/1_1_1/0-8_0-8_0-2"]
    assert all("bad/1_1_1/0-8_0-8_0-2.tiff" in m for m in decoded), decoded
    # The operator's log keeps the whole path.
    text = "\n".join(formatEvent(e) or "" for e in logged)
    assert str(garbage) in text
