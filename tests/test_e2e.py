"""End to end: ``twistd neurotrale`` as users start it, read by cloud-volume over HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

TWISTD = str(Path(sys.executable).parent / "twistd")


def assemble(scale_dir: Path, size: tuple[int, int, int]) -> np.ndarray:
    """The whole (x, y, z) volume of one scale, put together from its TIFF files."""
    x, y, z = size
    volume = np.zeros((x, y, z), dtype="uint16")
    for path in scale_dir.glob("*.tiff"):
        (x0, x1), (y0, y1), (z0, z1) = (map(int, part.split("-")) for part in path.stem.split("_"))
        volume[x0:x1, y0:y1, z0:z1] = tifffile.imread(path).transpose(2, 1, 0)
    return volume


class Twistd:
    """A ``twistd -n neurotrale`` process listening on a free port, with ``workers`` processes.

    Ready once the parent listens and every worker process said it serves.
    """

    def __init__(
        self,
        root: Path,
        log: Path,
        *args: str,
        workers: int = 1,
        preexec_fn: Callable[[], None] | None = None,
        cwd: Path | None = None,
    ) -> None:
        env = {**os.environ, "PRECOMPUTED_LOGGING": str(log)}
        self.log = log
        self.process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "neurotrale",
                "--path",
                str(root),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--workers",
                str(workers),
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
            cwd=cwd,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            match = re.search(r"NeurotraleSite starting on (\d+)", text)
            if (
                match
                and len(re.findall(r"worker \d+ serving on", text)) >= workers - 1
                and self._answers(f"http://127.0.0.1:{match.group(1)}")
            ):
                self.url = f"http://127.0.0.1:{match.group(1)}"
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        out = self.process.stdout.read().decode() if self.process.stdout else ""
        raise RuntimeError(f"twistd did not start:\n{out}")

    @staticmethod
    def _answers(url: str) -> bool:
        """Whether the server answers: its reactor runs (and has its signal handlers)."""
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        return self.process.returncode


@pytest.fixture
def twistd_server(demo_root: Path, tmp_path: Path) -> Iterator[Twistd]:
    server = Twistd(demo_root, tmp_path / "server.log")
    yield server
    server.stop()


def test_cloud_volume_reads_every_scale_byte_exact(twistd_server: Twistd, demo_root: Path) -> None:
    from cloudvolume import CloudVolume

    info = json.loads((demo_root / "demo-brain" / "info").read_text())
    for mip, scale in enumerate(info["scales"]):
        volume = CloudVolume(
            f"precomputed://{twistd_server.url}/demo-brain",
            mip=mip,
            progress=False,
            cache=False,
            fill_missing=False,
        )
        x, y, z = scale["size"]
        cutout = np.asarray(volume[0:x, 0:y, 0:z])
        assert cutout.shape == (x, y, z, 1)
        expected = assemble(demo_root / "demo-brain" / scale["key"], (x, y, z))
        assert np.array_equal(cutout[..., 0], expected), scale["key"]
    # A cutout not aligned to chunks, across chunk edges.
    volume = CloudVolume(
        f"precomputed://{twistd_server.url}/demo-brain", progress=False, cache=False
    )
    part = np.asarray(volume[37:141, 50:170, 5:60])[..., 0]
    whole = assemble(demo_root / "demo-brain" / "1_1_1", tuple(info["scales"][0]["size"]))
    assert np.array_equal(part, whole[37:141, 50:170, 5:60])


def test_cloud_volume_fills_missing_chunks(demo_root: Path, tmp_path: Path) -> None:
    from cloudvolume import CloudVolume

    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    (root / "demo-brain" / "1_1_1" / "64-128_0-64_0-32.tiff").unlink()
    server = Twistd(root, tmp_path / "server.log")
    try:
        volume = CloudVolume(
            f"precomputed://{server.url}/demo-brain", progress=False, cache=False, fill_missing=True
        )
        cutout = np.asarray(volume[0:200, 0:64, 0:32])[..., 0]
        assert not cutout[64:128].any()
        expected = assemble(root / "demo-brain" / "1_1_1", (200, 176, 72))
        assert np.array_equal(cutout[:64], expected[:64, :64, :32])
        assert np.array_equal(cutout[128:], expected[128:, :64, :32])
    finally:
        server.stop()


def test_plain_http_client_and_log_file(twistd_server: Twistd) -> None:
    with urllib.request.urlopen(f"{twistd_server.url}/demo-brain/1_1_1/0-64_0-64_0-32") as answer:
        assert answer.status == 200
        assert len(answer.read()) == 64 * 64 * 32 * 2
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{twistd_server.url}/demo-brain/provenance")
    assert missing.value.code == 404
    assert "serving" in twistd_server.log.read_text()


def test_sigterm_stops_the_server(demo_root: Path, tmp_path: Path) -> None:
    server = Twistd(demo_root, tmp_path / "server.log")
    started = time.monotonic()
    # twistd shuts down cleanly, then re-raises the signal so its exit status tells why.
    assert server.stop() in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
    assert "Main loop terminated" in server.log.read_text()


def test_twistd_help_and_bad_root(tmp_path: Path) -> None:
    shown = subprocess.run([TWISTD, "neurotrale", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for option in ("--path", "--listen", "--port", "--workers", "--follow-symlinks"):
        assert option in shown.stdout
    refused = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "neurotrale", "--path", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "is not a directory" in refused.stdout + refused.stderr
