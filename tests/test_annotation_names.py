"""A write to an annotation block under a name that is no annotation file name is a 400
naming the rule (not a 405 "method is not allowed"), and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest_twisted
import treq

from tests.conftest import RunningServer

BLOCK = "demo-brain/annotations/x0y0z0"
RULE = "use letters, digits, '-', '_' and '.', end with '.json'"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest_twisted.ensureDeferred
async def test_a_bad_annotation_file_name_is_a_400_naming_the_rule(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    before = snapshot(data_root)
    for method, name in [
        ("PUT", "slice%20one.json"),
        ("PUT", "notes.txt"),
        ("PATCH", "z%240117.json?id=a"),
        ("DELETE", "fibers.JSON?id=a"),
        ("PUT", "a..b.json"),
    ]:
        answer = await treq.request(method, f"{server.url}/{BLOCK}/{name}", data=b"[]")
        body = json.loads(await treq.content(answer))
        assert (answer.code, body["status"]) == (400, 400), (method, name, body)
        assert RULE in body["error"] or "ending in '.json'" in body["error"], body
    # Reads of such a name are still plain files (404 here), and other paths keep their 405.
    assert (await treq.get(f"{server.url}/{BLOCK}/notes.txt")).code == 404
    assert (await treq.put(f"{server.url}/demo-brain/info", data=b"{}")).code == 405
    assert snapshot(data_root) == before
