"""In a real browser (headless Chromium): the API documentation works with no internet, and
a page from another origin reads and writes through the API as the viewer does, under the
CORS rules browsers enforce.

Uses the system's Chromium (Debian's ``chromium`` package), driven by Playwright; no browser
is ever downloaded. Without Chromium the tests are skipped, except under ``CI=true``, where
that is a failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from twisted.web.static import File

from tests.conftest import RunningServer

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T = TypeVar("T")


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def require_browser() -> None:
    """Skip without a browser; under CI=true a missing browser fails instead."""
    missing = _missing_browser()
    if missing is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run in CI: {missing}")
    pytest.skip(missing)


@pytest.fixture(autouse=True)
def browser_available() -> None:
    """Skip without a browser; under CI=true a missing browser fails instead."""
    require_browser()


def in_browser(work: Callable[[Any], T]) -> T:
    """Run ``work(page)`` with a fresh page of a headless Chromium (blocking: use a thread)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(20_000)
            return work(page)
        finally:
            browser.close()


@dataclass(frozen=True)
class SeenRequest:
    """A request as the server received it."""

    method: str
    uri: str
    origin: str | None
    content_type: str | None
    #: ``Access-Control-Request-Method``: the method a preflight asks about.
    preflight_for: str | None


class RecordingResource(Resource):
    """Wraps a site's root resource and notes each request as the server received it."""

    isLeaf = True

    def __init__(self, inner: IResource, seen: list[SeenRequest]) -> None:
        super().__init__()
        self.inner = inner
        self.seen = seen

    def render(self, request: IRequest) -> Any:
        """Note the request, then let the real root answer it."""

        def text(name: bytes) -> str | None:
            value = request.getHeader(name)
            return None if value is None else value.decode("latin-1")

        self.seen.append(
            SeenRequest(
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
                origin=text(b"origin"),
                content_type=text(b"content-type"),
                preflight_for=text(b"access-control-request-method"),
            )
        )
        return self.inner.render(request)


def recorded(server: RunningServer) -> list[SeenRequest]:
    """Start noting the requests ``server`` receives; returns the list they go into."""
    seen: list[SeenRequest] = []
    site = server.port.factory
    site.resource = RecordingResource(site.resource, seen)
    return seen


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[str]:
    """A plain twisted.web static server on another port, serving a blank viewer page."""
    pages = tmp_path / "other-origin"
    pages.mkdir()
    (pages / "viewer.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>viewer</title></head>"
        "<body><p>a page of another origin</p></body></html>"
    )
    port = reactor.listenTCP(0, Site(File(str(pages))), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


# --- the documentation --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_swagger_ui_renders_and_tries_the_chunk_route(
    serve: Callable[..., RunningServer], demo_root: Path
) -> None:
    server = serve(demo_root)
    base = server.url

    def browse(page: Any) -> dict[str, Any]:
        left_host: list[str] = []
        problems: list[str] = []

        def guard(route: Any) -> None:
            if route.request.url.startswith(base + "/"):
                route.continue_()
            else:
                left_host.append(route.request.url)
                route.abort()

        page.route("**/*", guard)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        page.goto(base + "/api/")
        page.wait_for_selector(".opblock-summary-path")
        title = page.inner_text(".info .title")
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        methods = page.locator(".opblock-summary-method").all_inner_texts()

        if os.environ.get("SWAGGER_SCREENSHOT"):
            page.screenshot(path=os.environ["SWAGGER_SCREENSHOT"])

        chunk = page.locator("#operations-images-getChunk")
        chunk.locator(".opblock-summary").click()
        chunk.get_by_role("button", name="Try it out").click()
        values = {
            name: chunk.locator(f'tr[data-param-name="{name}"] input').input_value()
            for name in ("dataset", "key", "chunk")
        }
        chunk.get_by_role("button", name="Execute").click()
        status = chunk.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for()
        return {
            "title": title,
            "paths": paths,
            "methods": methods,
            "values": values,
            "status": status.inner_text().strip(),
            "request_url": chunk.locator(".request-url pre").inner_text(),
            "left_host": left_host,
            "problems": problems,
        }

    seen = await deferToThread(in_browser, browse)
    assert seen["title"].startswith("NeuroTrALE precomputed service")
    for path in (
        "/{dataset}/{key}/{chunk}",
        "/{dataset}/annotations/{block}/{name}",
        "/index.html",
        "/{rest}",
        "/api/openapi.json",
        "/healthz",
        "/metrics",
    ):
        assert any(p.replace("\u200b", "") == path for p in seen["paths"]), path
    assert {"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"} <= set(seen["methods"])
    assert seen["values"] == {"dataset": "demo-brain", "key": "1_1_1", "chunk": "0-64_0-64_0-32"}
    assert seen["status"] == "200"
    assert seen["request_url"] == base + "/demo-brain/1_1_1/0-64_0-64_0-32"
    assert seen["left_host"] == [], "the documentation asked another host for something"
    assert seen["problems"] == []


# --- another origin, as the viewer ----------------------------------------------------------

VIEWER_SESSION = """async ({api, file, records, patched}) => {
  const seen = {};
  const info = await fetch(`${api}/demo-brain/info`);
  seen.info = [info.status, (await info.json()).scales[0].key];
  const chunk = await fetch(`${api}/demo-brain/1_1_1/0-64_0-64_0-32`);
  seen.chunk = [chunk.status, (await chunk.arrayBuffer()).byteLength];
  seen.chunkHeaders = [chunk.headers.get("etag") !== null, chunk.headers.get("content-encoding")];
  const fibers = await fetch(`${api}/demo-brain/annotations/x0y0z0/fibers.json`);
  seen.fibers = [fibers.status, (await fibers.json()).length];
  // The viewer's save: the whole file as a string, so the body is text/plain;charset=UTF-8.
  const put = await fetch(file, {method: "PUT", body: JSON.stringify(records)});
  seen.put = [put.status, await put.json(), put.headers.get("etag") !== null];
  const patch = await fetch(`${file}?id=${encodeURIComponent(patched.id)}`,
                            {method: "PATCH", body: JSON.stringify(patched)});
  seen.patch = [patch.status, await patch.json()];
  const gone = await fetch(`${file}?id=${records[0].id}`, {method: "DELETE"});
  seen.delete = [gone.status, await gone.json()];
  const again = await fetch(file);
  seen.after = (await again.json()).map((r) => r.id);
  return seen;
}"""

REFUSED_SESSION = """async ({api, file}) => {
  const refused = {};
  for (const [name, request] of [
    ["read", () => fetch(`${api}/demo-brain/info`)],
    ["put", () => fetch(file, {method: "PUT", body: "[]"})],
  ]) {
    try { await request(); refused[name] = false; } catch (error) { refused[name] = true; }
  }
  return refused;
}"""


def polygon(rid: str, z: int) -> dict[str, Any]:
    """A polygon record as the viewer writes it."""
    return {
        "points": [[10, 20, z], [14, 22, z], [12.5, 30.25, z]],
        "type": "polygon",
        "id": rid,
        "anntype": "glia",
        "reviewed": False,
        "visited": True,
    }


@pytest_twisted.ensureDeferred
async def test_a_page_of_another_origin_reads_and_writes_like_the_viewer(
    serve: Callable[..., RunningServer], data_root: Path, other_origin: str
) -> None:
    server = serve(data_root)
    seen_by_server = recorded(server)
    relative = "demo-brain/annotations/x0y0z0/z-0042.json"
    file = f"{server.url}/{relative}"
    records = [polygon("9f1c" * 10, 42), polygon("1bcd4c15-5ddc-4a36-9871-faca72f9f41b", 42)]
    patched = {**polygon("third", 42), "anntype": "neuron"}

    def browse(page: Any) -> Any:
        page.goto(other_origin + "/viewer.html")
        arguments = {"api": server.url, "file": file, "records": records, "patched": patched}
        return page.evaluate(VIEWER_SESSION, arguments)

    seen = await deferToThread(in_browser, browse)
    assert seen["info"] == [200, "1_1_1"]
    assert seen["chunk"] == [200, 64 * 64 * 32 * 2]
    assert seen["chunkHeaders"][0] is True, "ETag is not exposed to scripts"
    assert seen["fibers"][0] == 200 and seen["fibers"][1] > 0
    assert seen["put"] == [201, {"filename": "z-0042.json", "count": 2}, True]
    assert seen["patch"] == [200, {"id": "third"}]
    assert seen["delete"] == [200, {"id": records[0]["id"]}]
    assert seen["after"] == [records[1]["id"], "third"]
    on_disk = json.loads((data_root / relative).read_bytes())
    assert on_disk == [records[1], patched]

    # The browser asked first (a preflight from the page's origin), then wrote.
    writes = [r for r in seen_by_server if r.uri.startswith(f"/{relative}")]
    assert [(r.method, r.preflight_for) for r in writes[:2]] == [
        ("OPTIONS", "PUT"),
        ("PUT", None),
    ]
    assert all(r.origin == other_origin for r in writes)
    assert writes[1].content_type == "text/plain;charset=UTF-8"
    assert {r.preflight_for for r in writes if r.method == "OPTIONS"} == {
        "PUT",
        "PATCH",
        "DELETE",
    }


@pytest_twisted.ensureDeferred
async def test_the_browser_refuses_what_cors_does_not_allow(
    serve: Callable[..., RunningServer], data_root: Path, other_origin: str
) -> None:
    """The control experiment: with only another origin allowed, the same page can neither
    read nor write, so what the test above proves rests on the server's CORS answers."""
    server = serve(data_root, cors=("https://viewer.lab.example",))
    seen_by_server = recorded(server)
    relative = "demo-brain/annotations/x0y0z0/fibers.json"
    before = (data_root / relative).read_bytes()

    def browse(page: Any) -> Any:
        page.goto(other_origin + "/viewer.html")
        return page.evaluate(
            REFUSED_SESSION, {"api": server.url, "file": f"{server.url}/{relative}"}
        )

    refused = await deferToThread(in_browser, browse)
    assert refused == {"read": True, "put": True}
    assert (data_root / relative).read_bytes() == before
    assert [r.method for r in seen_by_server if r.uri == f"/{relative}"] == ["OPTIONS"]
