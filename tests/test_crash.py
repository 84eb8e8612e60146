"""Crash safety: a storm of annotation writes while workers and the parent are SIGKILLed.

Afterwards every annotation file (and every kept version) must be valid JSON holding exactly
one of the contents that were written, every PATCH the server acknowledged must be in its
file, and the temporary files of interrupted writes must be gone after a restart.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .test_e2e import Twistd
from .test_workers import alive, children_of, start, wait_for

__all__ = ["start"]  # the fixture, imported for pytest

BLOCK = "demo-brain/annotations/x0y0z0"
PUT_FILES = ["fibers.json", "z-0010.json", "z-0020.json", "storm-a.json"]
PATCH_FILE = "storm-patched.json"
ROUNDS = 12
PARENT_KILLS = (4, 9)


def compact(records: list[dict[str, object]]) -> bytes:
    """A body as the server stores it (compact JSON)."""
    return json.dumps(records, separators=(",", ":")).encode()


class Storm:
    """Writer threads putting and patching annotation files on whichever server is up."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.sent: dict[str, set[bytes]] = {name: set() for name in PUT_FILES}
        self.acknowledged_patches: set[str] = set()
        self.attempts = 0
        self.acknowledged = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _send(self, method: str, path: str, body: bytes) -> bool:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                answer.read()
                return answer.status in (200, 201)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _write(self, number: int) -> None:
        rng = random.Random(number)
        counter = 0
        while not self._stop.is_set():
            counter += 1
            record_id = f"w{number}-{counter}"
            if rng.random() < 0.3:
                record: dict[str, object] = {
                    "id": record_id,
                    "type": "point",
                    "point": [1, 2, counter],
                }
                ok = self._send(
                    "PATCH", f"/{BLOCK}/{PATCH_FILE}?id={record_id}", json.dumps(record).encode()
                )
                with self._lock:
                    self.attempts += 1
                    if ok:
                        self.acknowledged += 1
                        self.acknowledged_patches.add(record_id)
                continue
            name = rng.choice(PUT_FILES)
            # Large enough that a kill can land in the middle of writing it.
            records = [
                {
                    "id": f"{record_id}-{i}",
                    "type": "linestring",
                    "anntype": "axon",
                    "points": [[i, counter, number], [i + 1, counter, number]],
                }
                for i in range(rng.randint(1, 3000))
            ]
            body = compact(records)
            with self._lock:
                self.sent[name].add(body)  # before sending: it may land even if we hear nothing
                self.attempts += 1
            if self._send("PUT", f"/{BLOCK}/{name}", body):
                with self._lock:
                    self.acknowledged += 1


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_storm_of_writes_while_workers_and_the_parent_are_killed(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    block = data_root / BLOCK
    allowed = {
        name: {(block / name).read_bytes()} if (block / name).exists() else set()
        for name in PUT_FILES
    }
    launches = iter(range(100))

    def launch() -> Twistd:
        return start(data_root, tmp_path / f"server-{next(launches)}.log", workers=3)

    server = launch()
    storm = Storm(server.url)
    storm.start()
    rng = random.Random(2026)
    worker_kills = parent_kills = 0
    for round_number in range(ROUNDS):
        time.sleep(rng.uniform(0.2, 0.6))
        parent = server.process.pid
        if round_number in PARENT_KILLS:
            orphans = children_of(parent)
            os.kill(parent, signal.SIGKILL)
            server.process.wait(timeout=10)

            def orphans_gone(pids: set[int] = orphans) -> bool:
                return not any(alive(pid) for pid in pids)

            wait_for(orphans_gone, 15, "orphans to exit")
            parent_kills += 1
            server = launch()
            storm.url = server.url
        else:
            workers = sorted(children_of(parent))
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
                worker_kills += 1
    storm.stop()
    server.stop()

    torn = 0
    for name in PUT_FILES:
        contents = allowed[name] | storm.sent[name]
        current = block / name
        versions = list((block / ".versions" / name).glob("*.json"))
        for path in [current, *versions] if current.exists() else versions:
            data = path.read_bytes()
            json.loads(data)  # valid JSON, or the test fails here
            torn += data not in contents
    patched = json.loads((block / PATCH_FILE).read_bytes())
    ids = [record["id"] for record in patched]
    lost = len(storm.acknowledged_patches - set(ids))
    assert len(ids) == len(set(ids))
    left = temporaries(data_root)
    print(
        f"storm: {ROUNDS} rounds, {worker_kills} worker kills, {parent_kills} parent kills, "
        f"{storm.attempts} writes sent, {storm.acknowledged} acknowledged, "
        f"{len(storm.acknowledged_patches)} acknowledged PATCHes, lost={lost}, torn={torn}, "
        f"temporary files left by kills: {len(left)}"
    )
    assert torn == 0 and lost == 0
    assert storm.acknowledged > 50

    # Temporary files of killed writes are removed at start-up once they are surely abandoned
    # (one is planted too, in case no kill landed in the middle of a write this time).
    planted = block / ".fibers.json.tmp-0123456789abcdef"
    planted.write_bytes(b'[{"id":"half')
    for path in [*left, planted]:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    server = launch()
    wait_for(lambda: not temporaries(data_root), 15, "start-up to remove temporary files")
    server.stop()
