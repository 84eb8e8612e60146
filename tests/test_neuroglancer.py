"""Stock Neuroglancer, in a real browser, shows the demo volume that ``twistd neurotrale`` serves.

The viewer page is built from the npm package ``neuroglancer`` by ``tests/viewer`` (``npm ci``
and ``npm run build``: .ci/run does both; here they run once per session when ``node_modules``
or ``dist`` is missing or older than its sources). Headless Chromium opens it on
``precomputed://http://127.0.0.1:PORT/demo-brain`` (the dataset ``neurotrale-demo`` writes),
waits until Neuroglancer says it has everything it asked for, and the test checks each chunk
answer's length, the console and the pixels of the slice. A control dataset with the same
``info`` and no chunks must render blank, so the pixel check can fail.

Without npm or Chromium the tests are skipped, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.server import Site
from twisted.web.static import File

from tests.test_browser import browser_available, in_browser
from tests.test_e2e import Twistd

__all__ = ["browser_available"]  # the autouse fixture: skip (or fail in CI) without Chromium

VIEWER = Path(__file__).parent / "viewer"
#: What the build reads: a change to one of these rebuilds the page.
VIEWER_SOURCES = ("package.json", "package-lock.json", "index.html", "main.js", "vite.config.js")
DEMO = Path(sys.executable).parent / "neurotrale-demo"
#: A chunk's path: /{dataset}/{scale key}/{x0-x1_y0-y1_z0-z1}.
CHUNK_PATH = re.compile(r"^/(?P<dataset>[^/]+)/(?P<key>[^/]+)/(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)$")
#: The data type sizes the demo's info may name.
BYTES_PER_VOXEL = {"uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "float32": 4}
#: Requests that may be answered 404 however the server works: the demo's info names a mesh
#: directory it does not write (Neuroglancer then asks for ``mesh/info``), and no page has an icon.
EXPECTED_404 = re.compile(r"/(demo-brain|no-chunks)/mesh/info$|/favicon\.ico$")


def in_ci() -> bool:
    """Whether this runs as CI (``CI=true``), where a missing tool fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def needs_build(target: Path, sources: list[Path]) -> bool:
    """Whether ``target`` is missing or older than one of ``sources``."""
    if not target.exists():
        return True
    built = target.stat().st_mtime
    return any(source.stat().st_mtime > built for source in sources)


@pytest.fixture(scope="session")
def viewer_dist() -> Path:
    """The built viewer page (``tests/viewer/dist``): installed and built once if stale."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        missing = "node and npm are not installed (apt-get install nodejs npm)"
        if in_ci():
            pytest.fail(f"the Neuroglancer test cannot run in CI: {missing}")
        pytest.skip(missing)
    lock = VIEWER / "package-lock.json"
    if needs_build(VIEWER / "node_modules" / ".package-lock.json", [lock]):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=VIEWER, check=True)
    index = VIEWER / "dist" / "index.html"
    if needs_build(index, [VIEWER / name for name in VIEWER_SOURCES]):
        subprocess.run([npm, "run", "build"], cwd=VIEWER, check=True)
    return index.parent


@pytest.fixture(scope="module")
def shown_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root made by ``neurotrale-demo``, plus ``no-chunks``: the demo's ``info`` with
    none of its chunks (the control)."""
    root = tmp_path_factory.mktemp("neuroglancer-root")
    subprocess.run([str(DEMO), str(root)], check=True, capture_output=True)
    (root / "no-chunks").mkdir()
    shutil.copy(root / "demo-brain" / "info", root / "no-chunks" / "info")
    return root


@pytest.fixture(scope="module")
def data_served(shown_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    """``twistd -n neurotrale`` on ``shown_root``, on a free port."""
    server = Twistd(shown_root, tmp_path_factory.mktemp("neuroglancer-log") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def page_served(viewer_dist: Path) -> Iterator[str]:
    """The built page on a plain twisted.web static server (another origin than the data)."""
    port = reactor.listenTCP(0, Site(File(str(viewer_dist))), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


def viewer_state(source: str) -> dict[str, Any]:
    """Neuroglancer's state for one image layer: an xy slice at 4 screen pixels a voxel, through
    the middle of the volume, contrast for the demo's values, no overlays over the data."""
    return {
        "layers": [
            {
                "type": "image",
                "source": source,
                "name": "demo-brain",
                "shaderControls": {"normalized": {"range": [200, 2000]}},
            }
        ],
        "layout": "xy",
        "crossSectionScale": 4.5e-7,
        "showAxisLines": False,
        "showScaleBar": False,
        "showDefaultAnnotations": False,
    }


@dataclass
class Sight:
    """What the browser saw: answers from the data server, console errors, the slice's pixels."""

    #: (path, status, body length) of each answer from the data server.
    answers: list[tuple[str, int, int]] = field(default_factory=list)
    #: Requests to the data server that got no answer (failed or still pending at the end).
    unanswered: list[str] = field(default_factory=list)
    #: (text, url) of each console error of the page; page errors with url "". (Playwright does
    #: not relay the console of Neuroglancer's workers: their requests are checked as requests.)
    errors: list[tuple[str, str]] = field(default_factory=list)
    renderer: str = ""
    #: Whether Neuroglancer said it had drawn everything it asked for, within 30 s.
    ready: bool = False
    #: Standard deviation and number of distinct colours of the middle of the data panel.
    pixel_std: float = 0.0
    pixel_colours: int = 0


def look(page_url: str, data_url: str, dataset: str, screenshot: str | None = None) -> Sight:
    """Open the viewer on ``dataset`` in headless Chromium and wait for every chunk it asks."""
    state = viewer_state(f"precomputed://{data_url}/{dataset}")
    url = f"{page_url}/index.html#!{urllib.parse.quote(json.dumps(state))}"
    sight = Sight()
    #: Requests to the data server not finished yet, and the status of those answered.
    pending: dict[Any, str] = {}
    answered: dict[Any, int] = {}

    def browse(page: Any) -> Sight:
        page.set_viewport_size({"width": 800, "height": 600})

        def on_request(request: Any) -> None:
            if request.url.startswith(data_url + "/"):
                pending[request] = urllib.parse.urlsplit(request.url).path

        def on_response(response: Any) -> None:
            if response.request in pending:
                answered[response.request] = response.status

        def on_finished(request: Any) -> None:
            if request in pending:
                answered.pop(request, None)
                response = request.response()
                sight.answers.append((pending.pop(request), response.status, len(response.body())))

        def on_failed(request: Any) -> None:
            if request in pending:
                sight.unanswered.append(f"{pending.pop(request)} ({request.failure})")

        page.on("request", on_request)
        page.on("response", on_response)
        page.on("requestfinished", on_finished)
        page.on("requestfailed", on_failed)
        page.on(
            "console",
            lambda message: (
                sight.errors.append((message.text, message.location.get("url", "")))
                if message.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda error: sight.errors.append((f"page error: {error}", "")))
        page.goto(url)
        page.wait_for_function("() => window.viewer !== undefined")
        sight.renderer = page.evaluate(RENDERER)
        # Ready: Neuroglancer says so (the test its own screenshot tool uses), a chunk was
        # answered, no request is waiting for its answer; twice in a row, 250 ms apart.
        deadline, steady = time.monotonic() + 30, 0
        while steady < 2 and time.monotonic() < deadline:
            ready = page.evaluate("() => window.viewer.isReady()")
            chunks = [path for request, path in pending.items() if request in answered]
            chunks += [answer[0] for answer in sight.answers]
            waiting = [path for request, path in pending.items() if request not in answered]
            steady = (
                steady + 1 if ready and any(map(CHUNK_PATH.match, chunks)) and not waiting else 0
            )
            page.wait_for_timeout(250)
        sight.ready = steady >= 2
        page.mouse.move(400, 10)  # onto the empty top bar: hover widgets would cover the data
        page.wait_for_timeout(250)
        box = page.locator(".neuroglancer-rendered-data-panel").first.bounding_box()
        middle = {
            "x": box["x"] + box["width"] / 4,
            "y": box["y"] + box["height"] / 4,
            "width": box["width"] / 2,
            "height": box["height"] / 2,
        }
        pixels = imagecodecs.png_decode(page.screenshot(clip=middle))[..., :3]
        sight.pixel_std = float(pixels.std())
        sight.pixel_colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
        if screenshot:
            page.screenshot(path=screenshot)
        # An answer whose body the page never read (a 404 it gave up on) has no length.
        for request, path in pending.items():
            if request in answered:
                sight.answers.append((path, answered[request], -1))
            else:
                sight.unanswered.append(path)
        return sight

    return in_browser(browse)


#: The WebGL renderer the page gets (SwiftShader, Chromium's software one, without a GPU).
RENDERER = """() => {
  const gl = document.createElement("canvas").getContext("webgl2");
  if (gl === null) return "no WebGL 2";
  const debug = gl.getExtension("WEBGL_debug_renderer_info");
  return gl.getParameter(debug === null ? gl.RENDERER : debug.UNMASKED_RENDERER_WEBGL);
}"""


def expected_length(path: str, info: dict[str, Any]) -> int:
    """A raw chunk's length in bytes, from its name and the dataset's info."""
    match = CHUNK_PATH.match(path)
    assert match is not None, path
    (scale,) = [s for s in info["scales"] if s["key"] == match["key"]]
    assert scale["encoding"] == "raw"
    x0, x1, y0, y1, z0, z1 = map(int, match.groups()[2:])
    voxels = (x1 - x0) * (y1 - y0) * (z1 - z0)
    return voxels * int(info["num_channels"]) * BYTES_PER_VOXEL[info["data_type"]]


def slab(dataset: str, scale: dict[str, Any], z: int) -> set[str]:
    """The paths of the chunks of ``scale`` that the xy plane at voxel ``z`` cuts."""

    def spans(size: int, chunk: int) -> list[str]:
        return [f"{start}-{min(start + chunk, size)}" for start in range(0, size, chunk)]

    (cx, cy, cz), (x, y, _) = scale["chunk_sizes"][0], scale["size"]
    z0 = z - z % cz
    zs = f"{z0}-{min(z0 + cz, scale['size'][2])}"
    return {
        f"{dataset}/{scale['key']}/{xs}_{ys}_{zs}" for xs in spans(x, cx) for ys in spans(y, cy)
    }


def unexpected_errors(sight: Sight, not_found: set[str]) -> list[tuple[str, str]]:
    """The console errors other than a failed load of a path in ``not_found`` (answered 404)."""
    return [
        (text, url)
        for text, url in sight.errors
        if not (
            text.startswith("Failed to load resource: the server responded with a status of 404")
            and urllib.parse.urlsplit(url).path in not_found | {"/favicon.ico"}
        )
    ]


@pytest_twisted.ensureDeferred
async def test_stock_neuroglancer_renders_the_demo_slice(
    page_served: str, data_served: Twistd, shown_root: Path
) -> None:
    info = json.loads((shown_root / "demo-brain" / "info").read_text())
    screenshot = os.environ.get("NEUROGLANCER_SCREENSHOT")
    sight = await deferToThread(look, page_served, data_served.url, "demo-brain", screenshot)

    assert "SwiftShader" in sight.renderer or "ANGLE" in sight.renderer, sight.renderer
    chunks = [answer for answer in sight.answers if CHUNK_PATH.match(answer[0])]
    # At least every chunk of the finest scale that the middle slice (z = 36) cuts.
    assert {path for path, _, _ in chunks} >= slab("/demo-brain", info["scales"][0], 36)
    for path, status, length in chunks:
        assert (status, length) == (200, expected_length(path, info)), path
    assert sight.unanswered == []
    assert sight.ready
    not_found = {path for path, status, _ in sight.answers if status == 404}
    assert all(EXPECTED_404.search(path) for path in not_found), not_found
    assert {(path, status) for path, status, _ in sight.answers} >= {("/demo-brain/info", 200)}
    assert unexpected_errors(sight, not_found) == []
    # The slice shows the data: noise and cells (seen: 148 colours, standard deviation 17.6).
    assert sight.pixel_std > 5, sight
    assert sight.pixel_colours > 50, sight


@pytest_twisted.ensureDeferred
async def test_a_dataset_without_chunks_renders_blank(
    page_served: str, data_served: Twistd, shown_root: Path
) -> None:
    """The control: the same info with every chunk missing shows nothing, so the pixel check
    above rests on the chunks the server sent."""
    sight = await deferToThread(look, page_served, data_served.url, "no-chunks")

    chunks = [answer for answer in sight.answers if CHUNK_PATH.match(answer[0])]
    info = json.loads((shown_root / "no-chunks" / "info").read_text())
    assert {path for path, _, _ in chunks} >= slab("/no-chunks", info["scales"][0], 36)
    assert {status for _, status, _ in chunks} == {404}
    assert sight.unanswered == []
    assert sight.ready
    not_found = {path for path, status, _ in sight.answers if status == 404}
    assert unexpected_errors(sight, not_found) == []
    assert sight.pixel_colours == 1 and math.isclose(sight.pixel_std, 0.0), sight
