"""Attacks on annotation writes by someone with write access to the data root (issue 11).

A real ``twistd neurotrale --workers 2`` serves the demo root; writes come over HTTP from
client threads while an attacker thread swaps directories for links to an outside
directory (``renameat2(RENAME_EXCHANGE)``: atomic), plants links at the lock and in the
history, plants a FIFO, or moves the dataset away. What must hold: nothing outside the root
is ever created or changed, no link planted in the history is ever served, every
acknowledged PATCH is in its file, and a moved dataset is never recreated. Figures are
printed (``pytest -s``).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from .test_e2e import Twistd
from .test_workers import start

__all__ = ["start"]  # the fixture, imported for pytest

DATASET = "demo-brain"
BLOCK = f"{DATASET}/annotations/x0y0z0"
SWAPS = 3000

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2``), else in two steps."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    spare = a.with_name(a.name + ".swap")  # pragma: no cover - not Linux
    os.rename(a, spare)
    os.rename(b, a)
    os.rename(spare, b)


def serving(
    start: Callable[..., Twistd], root: Path, log: Path, *args: str, workers: int
) -> Twistd:
    """A started server whose standard output is read, so that a busy one never blocks on it."""
    server = start(root, log, *args, workers=workers)
    out = server.process.stdout
    if out is not None:
        threading.Thread(
            target=lambda: [None for _ in iter(lambda: out.read(65536), b"")], daemon=True
        ).start()
    return server


def request(
    url: str, method: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP request; (status, body), or (0, b"") when no answer came."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def snapshot(top: Path) -> dict[str, bytes | None]:
    """Every entry under ``top`` (links as their target, files as bytes, directories None)."""
    seen: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            relative = str(full.relative_to(top))
            if full.is_symlink():
                seen[relative] = b"->" + os.fsencode(os.readlink(full))
            elif full.is_dir():
                seen[relative] = None
            else:
                seen[relative] = full.read_bytes()
    return seen


def point(rid: str) -> dict[str, object]:
    return {"id": rid, "type": "point", "point": [1, 2, 3], "anntype": "neuron"}


class Writers:
    """Client threads PUTting and PATCHing files of one block until told to stop."""

    def __init__(self, url: str, names: list[str], threads: int = 4) -> None:
        self.url = url
        self.names = names
        self.statuses: Counter[int] = Counter()
        self.patched: dict[str, set[str]] = {name: set() for name in names}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            name = self.names[i % len(self.names)]
            rid = f"w{n}-{i}"
            if i % 3 == 0:
                status, _ = request(
                    f"{self.url}/{BLOCK}/put-{name}", "PUT", json.dumps([point(rid)]).encode()
                )
            else:
                status, _ = request(
                    f"{self.url}/{BLOCK}/{name}", "PATCH", json.dumps(point(rid)).encode()
                )
                if status == 200:
                    with self._lock:
                        self.patched[name].add(rid)
            with self._lock:
                self.statuses[status] += 1
            i += 1


def attack(swap: Callable[[], None], swaps: int) -> int:
    """Run ``swap`` (there and back) ``swaps`` times, pausing a little; return the count."""
    for _ in range(swaps):
        swap()
        time.sleep(0.001)
    return swaps


def check_every_patch_is_there(server: Twistd, writers: Writers) -> int:
    lost = 0
    for name, ids in writers.patched.items():
        status, content = request(f"{server.url}/{BLOCK}/{name}", "GET")
        assert status == 200, (name, status)
        stored = {record["id"] for record in json.loads(content)}
        lost += len(ids - stored)
    return lost


@pytest.mark.parametrize("target", ["block", "annotations"])
def test_swapping_a_directory_for_a_link_never_writes_outside_the_root(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path, target: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x0y0z0").mkdir()  # so that the annotations swap leads somewhere plausible
    (outside / "fibers.json").write_text("[]")
    victim = data_root / (BLOCK if target == "block" else f"{DATASET}/annotations")
    decoy = victim.with_name(".decoy")
    decoy.symlink_to(outside)
    before = snapshot(outside)
    server = serving(start, data_root, tmp_path / "server.log", workers=2)

    def swap() -> None:
        exchange(victim, decoy)  # the directory's name now is a link to outside
        exchange(victim, decoy)  # and back

    with Writers(server.url, ["fibers.json", "race-a.json", "race-b.json"]) as writers:
        time.sleep(0.3)
        swaps = attack(swap, SWAPS)
    after = snapshot(outside)
    escapes = len(set(after.items()) ^ set(before.items()))
    lost = check_every_patch_is_there(server, writers)
    attempts = sum(writers.statuses.values())
    print(
        f"\nrace ({target}): swaps={swaps} attempts={attempts} statuses={dict(writers.statuses)} "
        f"escapes={escapes} lost={lost}"
    )
    assert escapes == 0, sorted(set(after) ^ set(before))
    assert lost == 0
    assert writers.statuses[200] + writers.statuses[201] > 50
    assert not [s for s in writers.statuses if s >= 500 or s == 0]


def test_a_planted_lock_link_is_never_followed(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    block = data_root / BLOCK
    (block / ".fibers.json.lock").unlink(missing_ok=True)
    (block / ".fibers.json.lock").symlink_to(outside / "created")
    before = snapshot(data_root)
    server = serving(start, data_root, tmp_path / "server.log", workers=1)
    status, content = request(
        f"{server.url}/{BLOCK}/fibers.json", "PUT", json.dumps([point("a")]).encode()
    )
    document = json.loads(content)
    assert status == 500 and document["status"] == 500
    assert ".fibers.json.lock" in document["error"] and str(tmp_path) not in document["error"]
    assert os.listdir(outside) == []
    assert snapshot(data_root) == before
    # Reads are not affected.
    assert request(f"{server.url}/{BLOCK}/fibers.json", "GET")[0] == 200


def test_links_planted_in_the_history_are_never_served(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('["the server key"]')
    block = data_root / BLOCK
    server = serving(start, data_root, tmp_path / "server.log", workers=1)
    url = f"{server.url}/{BLOCK}/planted.json"
    for i in range(3):
        assert request(url, "PUT", json.dumps([point(str(i))]).encode())[0] in (200, 201)
    versions = block / ".versions" / "planted.json"
    log = block / ".log" / "planted.json"
    real = {v: request(f"{url}?version={v}", "GET") for v in (1, 2)}
    assert real[1][0] == 200 and real[2][0] == 200
    # Version 1 replaced by a link, a new version 9 as a link, a file with only a link.
    (versions / "1.json").unlink()
    (versions / "1.json").symlink_to(secret)
    (versions / "9.json").symlink_to(secret)
    (block / ".versions" / "other.json").mkdir()
    (block / ".versions" / "other.json" / "1.json").symlink_to(secret)

    def everything() -> list[tuple[int, bytes]]:
        return [request(f"{url}?version={v}", "GET") for v in (1, 2, 3, 4, 9)] + [
            request(f"{url}?versions", "GET"),
            request(url, "GET"),
            request(f"{server.url}/{BLOCK}/other.json?version=1", "GET"),
            request(f"{server.url}/{BLOCK}/other.json?versions", "GET"),
        ]

    served = everything()
    assert all(b"the server key" not in body for _, body in served), served
    assert served[1] == real[2]  # the real version 2 is still served
    assert served[4][0] == 404  # 9: a link, and newer than the head
    assert served[7][0] == 404 and served[8][0] == 404
    assert json.loads(served[6][1]) == [point("2")]
    # A link as the log's next entry is not read either.
    log.mkdir(parents=True, exist_ok=True)
    (log / "4.json").symlink_to(secret)
    assert everything() == served
    # The next write does not follow the planted entry either: it takes the next number.
    assert request(url, "PATCH", json.dumps(point("x")).encode())[0] == 200
    assert secret.read_text() == '["the server key"]'
    assert json.loads(request(url, "GET")[1]) == [point("2"), point("x")]


def test_a_fifo_at_an_annotation_name_is_not_found_and_blocks_nothing(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    block = data_root / BLOCK
    os.mkfifo(block / "fifo.json")
    server = serving(start, data_root, tmp_path / "server.log", workers=1)
    started = time.monotonic()
    answers = [request(f"{server.url}/{BLOCK}/fifo.json", "GET") for _ in range(20)]
    assert [status for status, _ in answers] == [404] * 20
    assert json.loads(answers[0][1])["status"] == 404
    for query in ("?versions", "?version=1"):
        assert request(f"{server.url}/{BLOCK}/fifo.json{query}", "GET")[0] == 404
    assert request(f"{server.url}/healthz", "GET")[0] == 200
    assert time.monotonic() - started < 20


def test_a_dataset_moved_away_during_writes_is_never_recreated(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    dataset = data_root / DATASET
    moved = tmp_path / "moved-away"  # outside the root, on the same filesystem
    server = serving(start, data_root, tmp_path / "server.log", workers=2)
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    def write() -> None:
        i = 0
        while not stop.is_set():
            # Each write names a new block, so a write that recreates parents would show.
            z = (i % 9) * 3
            status, _ = request(
                f"{server.url}/{DATASET}/annotations/x{i % 50}y0z{z}/moved.json",
                "PUT",
                json.dumps([point(str(i))]).encode(),
            )
            statuses[status] += 1
            i += 1

    threads = [threading.Thread(target=write, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    phantoms = moves = 0
    for _ in range(300):
        os.rename(dataset, moved)
        time.sleep(0.002)
        if dataset.exists():
            phantoms += 1
            os.rename(dataset, tmp_path / f"phantom-{phantoms}")
        os.rename(moved, dataset)
        moves += 1
        time.sleep(0.002)
    os.rename(dataset, moved)
    time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(60)
    if dataset.exists():
        phantoms += 1
    late = request(f"{server.url}/{DATASET}/annotations/x1y1z1/late.json", "PUT", b"[]")
    print(f"\nmoved dataset: moves={moves} writes={dict(statuses)} phantoms={phantoms}")
    assert phantoms == 0
    assert not dataset.exists()
    assert late[0] == 404 and json.loads(late[1])["status"] == 404
    assert not [s for s in statuses if s >= 500 or s == 0]
    # Whatever landed, landed inside the dataset, which has its info file.
    assert (moved / "info").is_file()


def test_worker_processes_patching_one_file_keep_every_acknowledged_record(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    server = serving(start, data_root, tmp_path / "server.log", "--keep-versions", "5", workers=3)
    url = f"{server.url}/{BLOCK}/many.json"
    acknowledged: set[str] = set()
    statuses: Counter[int] = Counter()
    guard = threading.Lock()

    def patch(n: int) -> None:
        for i in range(40):
            rid = f"c{n}-{i}"
            status, _ = request(url, "PATCH", json.dumps(point(rid)).encode())
            with guard:
                statuses[status] += 1
                if status == 200:
                    acknowledged.add(rid)

    threads = [threading.Thread(target=patch, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stored = {record["id"] for record in json.loads(request(url, "GET")[1])}
    listing = json.loads(request(f"{url}?versions", "GET")[1])
    print(f"\nworkers: statuses={dict(statuses)} acknowledged={len(acknowledged)}")
    assert statuses == Counter({200: 320})
    assert acknowledged <= stored and len(stored) == 320
    assert len(listing) == 5
