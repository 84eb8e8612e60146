"""Methods are case-sensitive tokens (RFC 9110): only the exact ones route.

A lowercase or mixed-case spelling of a known method is ``405`` and an unknown token ``501``,
both as JSON, on every write route, under ``--read-only``, ``--htpasswd`` and neither; nothing
changes on disk. Requests go out on raw sockets so that no client upper-cases the method.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import RunningServer
from tests.support import raw_http
from tests.test_security import snapshot

FIBERS = "/demo-brain/annotations/x0y0z0/fibers.json"
RECORD = b'{"id":"new","type":"point","point":[1,2,3]}'
#: Every route that a write could reach: annotation files (with and without ``?id=``), a
#: chunk, a static file and a directory.
TARGETS = [
    FIBERS,
    FIBERS + "?id=fiber-1",
    "/demo-brain/annotations/x0y0z0/new.json",
    "/demo-brain/1_1_1/0-64_0-64_0-32",
    "/demo-brain/info",
    "/demo-brain/",
    "/",
]
#: Spellings of known methods that are not the method (RFC 9110: methods are case-sensitive).
CASE_VARIANTS = [
    "delete",
    "Delete",
    "dELETE",
    "put",
    "Put",
    "patch",
    "Patch",
    "post",
    "get",
    "Head",
    "options",
]
#: Tokens that name no method this server knows.
UNKNOWN = ["FOO", "PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "DELETE2", "X-DELETE"]
MODES = ["plain", "read-only", "htpasswd"]


def _server(
    mode: str, serve: Callable[..., RunningServer], root: Path, tmp_path: Path
) -> RunningServer:
    if mode == "read-only":
        return serve(root, read_only=True)
    if mode == "htpasswd":
        path = tmp_path / "htpasswd"
        path.write_bytes(b"alice:" + bcrypt.hashpw(b"s3cret-pw", bcrypt.gensalt(4)) + b"\n")
        return serve(root, htpasswd=str(path))
    return serve(root)


def _request(method: str, target: str, body: bytes, auth: bool = False) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: x",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    if auth:
        lines.append("Authorization: Basic YWxpY2U6czNjcmV0LXB3")  # alice:s3cret-pw
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body) if body else None


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_methods_that_are_not_exact_tokens_change_nothing(
    mode: str, serve: Callable[..., RunningServer], data_root: Path, tmp_path: Path
) -> None:
    server = _server(mode, serve, data_root, tmp_path)
    port = server.port.getHost().port
    before = snapshot(data_root)
    tried = 0
    for target in TARGETS:
        for method in CASE_VARIANTS + UNKNOWN:
            for auth in (False, True) if mode == "htpasswd" else (False,):
                body = RECORD if method.upper() in ("PUT", "PATCH", "POST") else b""
                answer = await deferToThread(raw_http, port, _request(method, target, body, auth))
                status, headers, document = _parse(answer)
                expected = 405 if method in CASE_VARIANTS else 501
                assert status == expected, (mode, method, target, answer[:300])
                assert document == {"error": document["error"], "status": expected}
                assert headers["content-type"] == "application/json"
                assert headers["access-control-allow-origin"] == "*"
                if expected == 405:
                    allow = [m.strip() for m in headers["allow"].split(",")]
                    assert "GET" in allow and "OPTIONS" in allow, headers["allow"]
                    writable = target.split("?")[0].endswith(".json") and "annotations" in target
                    assert ("DELETE" in allow) == writable, (target, allow)
                tried += 1
    assert snapshot(data_root) == before
    print(f"{mode}: {tried} requests with inexact or unknown methods; files changed: 0")


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_exact_methods_still_obey_the_write_policy(
    mode: str, serve: Callable[..., RunningServer], data_root: Path, tmp_path: Path
) -> None:
    server = _server(mode, serve, data_root, tmp_path)
    port = server.port.getHost().port
    path = data_root / FIBERS.lstrip("/")
    before = path.read_bytes()
    answer = await deferToThread(raw_http, port, _request("PATCH", FIBERS, RECORD))
    status, _, document = _parse(answer)
    assert status == {"plain": 200, "read-only": 403, "htpasswd": 401}[mode], answer[:300]
    if mode != "plain":
        assert path.read_bytes() == before
    else:
        assert document == {"id": "new"}
        records = json.loads(path.read_bytes())
        assert len(records) == len(json.loads(before)) + 1  # an update, never a delete
    # POST is a method this server knows and serves nowhere: 405 in every mode.
    status, headers, _ = _parse(await deferToThread(raw_http, port, _request("POST", FIBERS, b"")))
    assert status == 405 and "PATCH" in headers["allow"]
