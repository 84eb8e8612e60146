"""Write protection: --read-only, and --htpasswd credentials (Apache's own htpasswd tool)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.python import usage

from neurotrale_twisted.process.options import Options
from tests.conftest import RunningServer
from tests.support import header

FIBERS = "/demo-brain/annotations/x0y0z0/fibers.json"
RECORD = b'{"id":"new","type":"point","point":[1,2,3]}'


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    """An htpasswd file made by Apache's htpasswd with a bcrypt entry for alice."""
    tool = shutil.which("htpasswd")
    if tool is None:
        # Skipped on a machine without it; CI installs it, and there its absence is a failure.
        missing = "Apache's htpasswd (Debian package apache2-utils) is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(missing)
        pytest.skip(missing)
    path = tmp_path / "htpasswd"
    subprocess.run([tool, "-bcBC", "4", str(path), "alice", "s3cret-pw"], check=True)
    assert path.read_text().startswith("alice:$2y$")
    return path


@pytest_twisted.ensureDeferred
async def test_read_only_refuses_every_write(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root, read_only=True)
    path = data_root / FIBERS.lstrip("/")
    before = path.read_bytes()
    for method, url in [
        ("PUT", FIBERS),
        ("PATCH", FIBERS + "?id=new"),
        ("DELETE", FIBERS + "?id=x"),
    ]:
        response = await treq.request(method, server.url + url, data=RECORD)
        assert response.code == 403
        assert json.loads(await treq.content(response)) == {
            "error": "this server is read-only",
            "status": 403,
        }
        assert header(response, "access-control-allow-origin") == "*"
    assert path.read_bytes() == before
    assert (await treq.get(server.url + FIBERS)).code == 200
    assert (await treq.get(server.url + "/demo-brain/1_1_1/0-64_0-64_0-32")).code == 200
    assert (await treq.request("OPTIONS", server.url + FIBERS)).code == 204


@pytest_twisted.ensureDeferred
async def test_writes_need_credentials(
    serve: Callable[..., RunningServer], data_root: Path, htpasswd: Path, logged: list[Any]
) -> None:
    server = serve(data_root, htpasswd=str(htpasswd))
    path = data_root / FIBERS.lstrip("/")
    before = path.read_bytes()
    assert (await treq.get(server.url + FIBERS)).code == 200  # reads stay open
    for auth in (None, ("alice", "wrong"), ("mallory", "s3cret-pw")):
        response = await treq.put(server.url + FIBERS, data=b"[]", auth=auth)
        assert response.code == 401, auth
        assert header(response, "www-authenticate") == 'Basic realm="neurotrale"'
        assert json.loads(await treq.content(response))["status"] == 401
    # bcrypt refuses passwords over 72 bytes: a refusal, never a server error.
    long_password = await treq.put(server.url + FIBERS, data=b"[]", auth=("alice", "x" * 100))
    assert long_password.code == 401
    garbled = await treq.put(
        server.url + FIBERS, data=b"[]", headers={"Authorization": "Basic %%%"}
    )
    assert garbled.code == 401
    assert path.read_bytes() == before
    for _ in range(2):  # the second one is answered from the verified cache
        ok = await treq.put(server.url + FIBERS, data=b"[]", auth=("alice", "s3cret-pw"))
        assert ok.code == 200
    assert path.read_bytes() == b"[]"
    patched = await treq.patch(server.url + FIBERS, data=RECORD, auth=("alice", "s3cret-pw"))
    assert patched.code == 200
    encoded = base64.b64encode(b"alice:s3cret-pw").decode()
    text = json.dumps([repr(e) for e in logged])
    assert "s3cret-pw" not in text and encoded not in text and "wrong" not in text


@pytest_twisted.ensureDeferred
async def test_htpasswd_changes_are_seen_without_a_restart(
    serve: Callable[..., RunningServer], data_root: Path, htpasswd: Path
) -> None:
    server = serve(data_root, htpasswd=str(htpasswd))
    refused = await treq.put(server.url + FIBERS, data=b"[]", auth=("bob", "other-pw"))
    assert refused.code == 401
    subprocess.run(["htpasswd", "-bBC", "4", str(htpasswd), "bob", "other-pw"], check=True)
    accepted = await treq.put(server.url + FIBERS, data=b"[]", auth=("bob", "other-pw"))
    assert accepted.code == 200


@pytest_twisted.ensureDeferred
async def test_auth_reads_and_credentialed_cors(
    serve: Callable[..., RunningServer], data_root: Path, htpasswd: Path
) -> None:
    origin = "https://viewer.lab.org"
    server = serve(data_root, htpasswd=str(htpasswd), auth_reads=True, cors=(origin,))
    anonymous = await treq.get(server.url + FIBERS, headers={"Origin": origin})
    assert anonymous.code == 401
    assert header(anonymous, "access-control-allow-origin") == origin
    preflight = await treq.request(
        "OPTIONS",
        server.url + FIBERS,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.code == 204  # preflights never carry credentials
    assert "authorization" in (header(preflight, "access-control-allow-headers") or "")
    assert header(preflight, "access-control-allow-credentials") == "true"
    read = await treq.get(
        server.url + FIBERS, headers={"Origin": origin}, auth=("alice", "s3cret-pw")
    )
    assert read.code == 200
    assert header(read, "access-control-allow-origin") == origin
    assert header(read, "access-control-allow-credentials") == "true"


def test_options_for_write_protection(tmp_path: Path, htpasswd: Path) -> None:
    options = Options()
    options.parseOptions(["--path", str(tmp_path), "--read-only"])
    assert options["read-only"]
    with pytest.raises(usage.UsageError, match="--auth-reads needs --htpasswd"):
        Options().parseOptions(["--path", str(tmp_path), "--auth-reads"])
    with pytest.raises(usage.UsageError, match="cannot read the htpasswd file"):
        Options().parseOptions(["--path", str(tmp_path), "--htpasswd", str(tmp_path / "nope")])
    options = Options()
    options.parseOptions(["--path", str(tmp_path), "--htpasswd", str(htpasswd), "--auth-reads"])
    assert options["htpasswd"] == str(htpasswd) and options["auth-reads"]
