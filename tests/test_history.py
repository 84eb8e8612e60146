"""The history page of an annotation file (``?history``): served under a strict CSP, linked
from block listings, and, in a real browser (headless Chromium), a person puts an erased
slice back by a click, while a concurrent edit makes the restore refuse (412) instead of
being overwritten."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from neurotrale_twisted.web.history import CONTENT_SECURITY_POLICY, HISTORY_ASSETS
from tests.conftest import RunningServer
from tests.support import header
from tests.test_browser import in_browser, recorded, require_browser

SLICE = "demo-brain/annotations/x0y0z0/z-0010.json"
STRICT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"
)


@pytest.fixture
def browser() -> None:
    """Skip without a browser; under CI=true a missing browser fails instead."""
    require_browser()


# --- over HTTP ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_history_page_is_html_under_a_strict_policy(demo_server: RunningServer) -> None:
    url = f"{demo_server.url}/{SLICE}"
    answer = await treq.get(url + "?history")
    page = (await treq.content(answer)).decode()
    assert answer.code == 200
    assert header(answer, "content-type") == "text/html; charset=utf-8"
    policy = header(answer, "content-security-policy") or ""
    assert policy.startswith(STRICT_CSP)
    assert policy == CONTENT_SECURITY_POLICY.decode()
    assert header(answer, "x-content-type-options") == "nosniff"
    assert "<title>History of z-0010.json</title>" in page
    assert "<script>" not in page and "style=" not in page and "<style" not in page
    # Every file it loads is on this host, relative to the page (a proxy prefix keeps working).
    linked = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "../../../api/history.js" in linked and "../../../api/history.css" in linked
    for name, content_type in HISTORY_ASSETS.items():
        served = await treq.get(f"{demo_server.url}/api/{name}")
        assert served.code == 200, name
        assert header(served, "content-type") == content_type
        assert await treq.content(served)
    # HEAD has the headers and no body; GET without ?history is still the JSON file.
    head = await treq.head(url + "?history")
    assert head.code == 200 and await treq.content(head) == b""
    plain = await treq.get(url)
    assert header(plain, "content-type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_history_of_a_missing_file_is_a_json_404(demo_server: RunningServer) -> None:
    answer = await treq.get(f"{demo_server.url}/demo-brain/annotations/x0y0z0/no-such.json?history")
    assert answer.code == 404
    assert json.loads(await treq.content(answer))["status"] == 404


@pytest_twisted.ensureDeferred
async def test_block_listing_links_each_annotation_file_history(
    demo_server: RunningServer,
) -> None:
    block = await treq.get(f"{demo_server.url}/demo-brain/annotations/x0y0z0/")
    listing = (await treq.content(block)).decode()
    assert block.code == 200
    links = re.findall(r'<a class="history" href="([^"]+)">history</a>', listing)
    assert sorted(links) == sorted(
        f"{p.name}?history"
        for p in (demo_server.root / "demo-brain/annotations/x0y0z0").glob("*.json")
    )
    # Elsewhere, no history column: the annotations directory itself, and the dataset.
    for directory in ("demo-brain/annotations/", "demo-brain/"):
        other = (await treq.content(await treq.get(f"{demo_server.url}/{directory}"))).decode()
        assert "?history" not in other and "<th>History</th>" not in other, directory


# --- in the browser -----------------------------------------------------------------------


def _send(method: str, url: str, body: bytes) -> int:
    """A blocking request from another client (the browser thread runs this)."""
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(answer.status)


def _watch(page: Any, base: str) -> dict[str, list[str]]:
    """Abort and note any request to another host; note script errors."""
    seen: dict[str, list[str]] = {"left_host": [], "problems": []}

    def guard(route: Any) -> None:
        if route.request.url.startswith(base + "/"):
            route.continue_()
        else:
            seen["left_host"].append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.on("pageerror", lambda error: seen["problems"].append(f"page error: {error}"))
    page.on(
        "console",
        lambda m: seen["problems"].append(f"console: {m.text}") if m.type == "error" else None,
    )
    return seen


def _row(page: Any, version: str) -> list[str]:
    cells = page.locator(f'#versions tr[data-version="{version}"] td')
    return [text.strip() for text in cells.all_inner_texts()]


@pytest_twisted.ensureDeferred
async def test_erased_slice_is_restored_by_a_click(
    browser: None, serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    url = f"{server.url}/{SLICE}"
    on_disk = data_root / SLICE
    original = on_disk.read_bytes()
    records = json.loads(original)
    assert len(records) == 2
    # Some work, then the viewer's erasure: PUT [] over the slice.
    added = {"point": [50, 40, 10], "type": "point", "id": "added-later", "anntype": "neuron"}
    assert (await treq.patch(url + "?id=added-later", json.dumps(added).encode())).code == 200
    edited = {**records[0], "anntype": "glia", "reviewed": True}
    assert (await treq.patch(f"{url}?id={edited['id']}", json.dumps(edited).encode())).code == 200
    assert (await treq.put(url, b"[]")).code == 200
    assert on_disk.read_bytes() == b"[]"
    seen_by_server = recorded(server)

    def browse(page: Any) -> dict[str, Any]:
        watched = _watch(page, server.url)
        page.goto(url + "?history")
        page.wait_for_selector("body[data-loaded]")
        table = {v: _row(page, v) for v in ("current", "3", "2", "1")}
        page.locator('#versions tr[data-version="1"] button.show').click()
        shown = page.locator("#records tbody tr td:first-child").all_inner_texts()
        page.locator('#versions tr[data-version="1"] button.restore').click()
        page.wait_for_selector("#message.restored")
        message = page.inner_text("#message")
        page.wait_for_selector('#versions tr[data-version="4"]')
        after = {v: _row(page, v) for v in ("current", "4")}
        page.locator('#versions tr[data-version="3"] button.show').click()
        if os.environ.get("HISTORY_SCREENSHOT"):
            page.screenshot(path=os.environ["HISTORY_SCREENSHOT"], full_page=True)
        return {"table": table, "shown": shown, "message": message, "after": after, **watched}

    seen = await deferToThread(in_browser, browse)
    # The file on disk is the original again, byte for byte.
    assert on_disk.read_bytes() == original
    # version, saved, size, records, added, removed, changed, buttons
    table = seen["table"]
    assert table["current"][2:7] == ["2 B", "0", "0", "3", "0"]
    assert table["3"][3:7] == ["3", "0", "0", "1"]
    assert table["2"][3:7] == ["3", "1", "0", "0"]
    assert table["1"][3:7] == ["2", "\u2014", "\u2014", "\u2014"]
    assert table["1"][2] == f"{len(original)} B"
    assert sorted(seen["shown"]) == sorted(r["id"] for r in records)
    assert "Restored version 1" in seen["message"]
    # The erasure it replaced is kept too: restoring can be undone the same way.
    assert seen["after"]["current"][3:7] == ["2", "2", "0", "0"]
    assert seen["after"]["4"][3] == "0"
    puts = [r for r in seen_by_server if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].uri == f"/{SLICE}"
    assert seen["left_host"] == [] and seen["problems"] == []


@pytest_twisted.ensureDeferred
async def test_restore_refuses_over_a_concurrent_change(
    browser: None, serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    url = f"{server.url}/{SLICE}"
    on_disk = data_root / SLICE
    assert (await treq.put(url, b"[]")).code == 200
    # Records are data: markup in them is shown as text, never run.
    markup = '<img src="x" onerror="window.pwned = 1">'
    theirs = [{"point": [1, 2, 10], "type": "point", "id": "someone-else", "anntype": markup}]

    def browse(page: Any) -> dict[str, Any]:
        watched = _watch(page, server.url)
        page.goto(url + "?history")
        page.wait_for_selector("body[data-loaded]")
        # Someone else saves the slice after the page loaded it.
        status = _send("PUT", url, json.dumps(theirs).encode())
        page.locator('#versions tr[data-version="1"] button.restore').click()
        page.wait_for_selector("#message.refused")
        message = page.inner_text("#message")
        page.reload()
        page.wait_for_selector("body[data-loaded]")
        page.locator('#versions tr[data-version="current"] button.show').click()
        shown = page.locator("#records tbody td:nth-child(3)").all_inner_texts()
        pwned = page.evaluate("() => window.pwned")
        images = page.locator("#records img").count()
        return {
            "status": status,
            "message": message,
            "shown": shown,
            "pwned": pwned,
            "images": images,
            **watched,
        }

    seen = await deferToThread(in_browser, browse)
    assert seen["status"] == 200
    assert "changed by someone else" in seen["message"]
    assert json.loads(on_disk.read_bytes()) == theirs
    assert (seen["shown"], seen["pwned"], seen["images"]) == ([markup], None, 0)
    # The refusal was the server's 412; the browser logs that failed request as a console
    # error, nothing else.
    assert seen["left_host"] == []
    assert all("412" in p for p in seen["problems"]), seen["problems"]


@pytest_twisted.ensureDeferred
async def test_a_file_broken_on_disk_still_lists_its_versions_and_is_restored(
    browser: None, serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """Someone (another tool, a hand edit) left the file on disk as JSON that does not parse:
    exactly when a person needs the history, so the page still lists the versions, says the
    current content is not JSON, and puts a good version back by a click."""
    server = serve(data_root)
    url = f"{server.url}/{SLICE}"
    on_disk = data_root / SLICE
    original = on_disk.read_bytes()
    assert (await treq.put(url, b"[]")).code == 200
    on_disk.write_bytes(b'[{"id": "torn", "poi')

    def browse(page: Any) -> dict[str, Any]:
        watched = _watch(page, server.url)
        page.goto(url + "?history")
        page.wait_for_selector("body[data-loaded]")
        table = {v: _row(page, v) for v in ("current", "1")}
        page.locator('#versions tr[data-version="current"] button.show').click()
        shown = page.inner_text("#records-title")
        page.locator('#versions tr[data-version="1"] button.restore').click()
        page.wait_for_selector("#message.restored")
        return {"table": table, "shown": shown, **watched}

    seen = await deferToThread(in_browser, browse)
    assert on_disk.read_bytes() == original
    table = seen["table"]
    assert table["current"][3] == "not JSON"
    assert table["current"][4:7] == ["\u2014", "\u2014", "\u2014"]
    assert table["1"][3:7] == [str(len(json.loads(original))), "\u2014", "\u2014", "\u2014"]
    assert "not JSON" in seen["shown"]
    assert seen["left_host"] == [] and seen["problems"] == []


@pytest_twisted.ensureDeferred
async def test_restore_under_read_only_says_why_and_changes_nothing(
    browser: None, serve: Callable[..., RunningServer], data_root: Path
) -> None:
    on_disk = data_root / SLICE
    writable = serve(data_root)
    assert (await treq.put(f"{writable.url}/{SLICE}", b"[]")).code == 200  # a version
    server = serve(data_root, read_only=True)
    url = f"{server.url}/{SLICE}"

    def browse(page: Any) -> dict[str, Any]:
        watched = _watch(page, server.url)
        page.goto(url + "?history")
        page.wait_for_selector("body[data-loaded]")
        page.locator('#versions tr[data-version="1"] button.restore').click()
        page.wait_for_selector("#message.refused")
        return {"message": page.inner_text("#message"), **watched}

    seen = await deferToThread(in_browser, browse)
    assert seen["message"] == "Not restored: 403: this server is read-only"
    assert on_disk.read_bytes() == b"[]"
    # The browser logs the refused request as a console error, nothing else.
    assert seen["left_host"] == [] and all("403" in p for p in seen["problems"]), seen
