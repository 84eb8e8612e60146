"""Two hosts over one directory whose POSIX locks are local, behind a real haproxy.

Two ``bindfs`` mounts of one directory play two hosts of a shared file system whose locks are
not global (BeeGFS without ``tuneUseGlobalFileLocks``, Lustre with ``localflock``, NFS with
``local_lock=``); the test first proves that a ``fcntl`` lock through one mount does not block
the other. A ``twistd neurotrale --workers 2`` serves each mount, and haproxy
(``contrib/multihost/haproxy.cfg``) sends requests to both in turn. Many clients then PATCH,
DELETE and PUT (with and without ``If-Match``) concurrently, first undisturbed, then while
workers and parents of both hosts are SIGKILLed and restarted.

What must hold, as a client sees it over HTTP:

* every acknowledged write is in the result: an acknowledged PATCH's record is in its file
  exactly as sent, an acknowledged DELETE's record is not, a DELETE of an acknowledged record
  never answers 404; a PUT file ends as the body of one PUT that was acknowledged (or whose
  answer was lost to a kill), and never one older than an acknowledged PUT sent after it was
  answered; two PUTs with the same ``If-Match`` are never both acknowledged;
* no answer from a server is a 5xx (haproxy's own 502/503 for a request whose worker was
  killed under it count as "no answer": the client does not know and may retry);
* every GET during the writes is a whole JSON array;
* ``?versions`` lists at most ``--keep-versions`` + 2 versions, each one a whole JSON array
  holding content that was written.

A figures line is printed (``pytest -s``): writes acknowledged, lost, 5xx, retries, kills.

bindfs serves paths (libfuse's high-level API), and has one habit no network file system has:
while a name is being renamed over, opening it may fail with ENOENT for a moment (the kernel
still holds the replaced file's node, which no longer has a path). A server that opens the
current file to decide a write must not take that for "missing"; a GET may be answered 404
for a moment, which is counted in the figures ("GET 404 of a written file") but not failed.
The mounts keep no attribute cache (see ``bench.multihost_setup.NO_ATTRIBUTE_CACHE``).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.multihost_setup import (
    BLOCK,
    BLOCK_URL,
    DATASET,
    Balancer,
    Host,
    SharedDirectory,
    lock_blocks,
    missing_tools,
    wait_until,
    write_dataset,
)

MISSING = missing_tools()
needs_bindfs = pytest.mark.skipif(
    MISSING is not None and not os.environ.get("CI"), reason=MISSING or ""
)
REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

KEEP_VERSIONS = 6
VERSION_SLACK = 2
PATCH_FILES = ("records-0.json", "records-1.json")
PUT_FILES = ("slice-0.json", "slice-1.json")
WRITERS = 12
READERS = 2
#: Seconds of writes before the first kill, and the most the kill storm may last.
CALM_SECONDS = 10.0
STORM_SECONDS = 35.0
#: The kills, in order: (host index, what).
KILLS = (
    (0, "worker"),
    (1, "worker"),
    (0, "parent"),
    (1, "worker"),
    (0, "worker"),
    (1, "parent"),
    (0, "worker"),
    (1, "worker"),
    (0, "parent"),
    (1, "parent"),
)
#: How many times a client sends a write again when it got no answer (a killed worker).
RESENDS = 3


@dataclass
class Answer:
    """What a client got: the status, headers and body, and who produced it."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def from_server(self) -> bool:
        """Whether a NeuroTrALE process answered (haproxy's own errors lack the header)."""
        return self.headers.get("X-Neurotrale-Worker") is not None

    @property
    def lost(self) -> bool:
        """Whether the answer says nothing about the write: haproxy's own 5xx."""
        return self.status >= 500 and not self.from_server


@dataclass
class PutRecord:
    """One PUT (with its resends): its body, its If-Match, when it was sent and answered."""

    name: str
    marker: str
    records: list[dict[str, Any]]
    if_match: str | None
    start: float
    end: float = float("inf")
    outcome: str = "unknown"  # "acked", "refused" (412) or "unknown"


@dataclass
class Ledger:
    """Everything the clients sent and heard, for the checks at the end."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    storm: bool = False
    #: PATCHed record id -> (file, record, "acked" | "unknown").
    patched: dict[str, tuple[str, dict[str, Any], str]] = field(default_factory=dict)
    #: Record id -> "acked" | "unknown", for records a DELETE was sent for.
    deleted: dict[str, str] = field(default_factory=dict)
    puts: list[PutRecord] = field(default_factory=list)
    acknowledged: int = 0
    acknowledged_by_host: Counter[str] = field(default_factory=Counter)
    no_answer: int = 0
    server_errors: list[str] = field(default_factory=list)
    proxy_errors_calm: int = 0
    proxy_errors_storm: int = 0
    unexpected: list[str] = field(default_factory=list)
    #: Acknowledged records a DELETE answered 404 for: lost before anyone asked.
    vanished: list[str] = field(default_factory=list)
    torn_reads: list[str] = field(default_factory=list)
    reads: int = 0
    #: GETs answered 404 for a file already written (bindfs's lookups; see the docstring).
    missing_reads: int = 0
    #: File name -> when a write to it was first acknowledged.
    first_ack: dict[str, float] = field(default_factory=dict)
    #: Record id -> what each request about it heard, with when.
    history: dict[str, list[str]] = field(default_factory=dict)
    #: Records found wrong by the checks at the end.
    suspects: list[str] = field(default_factory=list)

    def heard(self, method: str, path: str, answer: Answer | None) -> None:
        """Count one answer (or its absence) of any request."""
        with self.lock:
            if answer is None:
                self.no_answer += 1
            elif answer.status >= 500 and answer.from_server:
                self.server_errors.append(f"{method} {path}: {answer.status} {answer.body[:200]!r}")
            elif answer.lost:
                self.no_answer += 1
                if self.storm:
                    self.proxy_errors_storm += 1
                else:
                    self.proxy_errors_calm += 1

    def note(self, key: str, start: float, method: str, answer: Answer | None) -> None:
        """Keep what happened to record (or PUT) ``key``, to explain a failure."""
        if answer is None:
            what = "no answer"
        else:
            what = (
                f"{answer.status} from {answer.headers.get('X-Neurotrale-Host', 'haproxy')} "
                f"({answer.headers.get('X-Neurotrale-Worker', '-')})"
            )
        with self.lock:
            self.history.setdefault(key, []).append(
                f"{start:.3f}-{time.monotonic():.3f} {method}: {what}"
            )

    def acked(self, answer: Answer, name: str) -> None:
        """Count an acknowledged write to file ``name``."""
        with self.lock:
            self.first_ack.setdefault(name, time.monotonic())
            self.acknowledged += 1
            self.acknowledged_by_host[answer.headers.get("X-Neurotrale-Host", "?")] += 1


def request(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
) -> Answer | None:
    """One request on a fresh connection; None when no answer came (reset, timeout)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def is_array(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), list)
    except ValueError:
        return False


class Clients:
    """Writer and reader threads sending to haproxy until told to stop."""

    def __init__(self, proxy: str, ledger: Ledger) -> None:
        self.proxy = proxy
        self.ledger = ledger
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._writer, args=(n,), daemon=True) for n in range(WRITERS)
        ] + [threading.Thread(target=self._reader, args=(n,), daemon=True) for n in range(READERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Answer | None:
        start = time.monotonic()
        answer = request(self.proxy, method, path, body, headers)
        self.ledger.heard(method, path, answer)
        if key is not None:
            self.ledger.note(key, start, method, answer)
        if answer is None or answer.lost or (answer.status >= 500):
            return None
        return answer

    def _writer(self, number: int) -> None:
        rng = random.Random(number)
        mine: list[str] = []  # acknowledged records of this thread, not deleted yet
        counter = 0
        while not self.stopping.is_set():
            counter += 1
            choice = rng.random()
            if choice < 0.22 and mine:
                self._delete(mine.pop(rng.randrange(len(mine))))
            elif choice < 0.62:
                record_id = f"t{number}-{counter}"
                if self._patch(rng.choice(PATCH_FILES), record_id, number, counter):
                    mine.append(record_id)
            else:
                self._put(rng, rng.choice(PUT_FILES), f"put-{number}-{counter}", choice > 0.85)

    def _patch(self, name: str, record_id: str, number: int, counter: int) -> bool:
        record = {
            "id": record_id,
            "type": "point",
            "point": [number, counter, 1.5],
            "anntype": "neuron",
            "description": f"writer {number}, write {counter}",
        }
        ledger = self.ledger
        with ledger.lock:
            ledger.patched[record_id] = (name, record, "unknown")
        for _ in range(1 + RESENDS):
            answer = self.send(
                "PATCH",
                f"{BLOCK_URL}/{name}?id={record_id}",
                json.dumps(record).encode(),
                key=record_id,
            )
            if answer is None:
                continue
            if answer.status == 200 and json.loads(answer.body) == {"id": record_id}:
                with ledger.lock:
                    ledger.patched[record_id] = (name, record, "acked")
                ledger.acked(answer, name)
                return True
            with ledger.lock:
                ledger.unexpected.append(f"PATCH {record_id}: {answer.status} {answer.body!r}")
            return False
        return False

    def _delete(self, record_id: str) -> None:
        ledger = self.ledger
        name = ledger.patched[record_id][0]
        with ledger.lock:
            ledger.deleted[record_id] = "unknown"
        for attempt in range(1 + RESENDS):
            answer = self.send("DELETE", f"{BLOCK_URL}/{name}?id={record_id}", key=record_id)
            if answer is None:
                continue
            if answer.status == 200:
                with ledger.lock:
                    ledger.deleted[record_id] = "acked"
                ledger.acked(answer, name)
            elif answer.status == 404 and attempt > 0:
                with ledger.lock:  # the earlier, unanswered DELETE removed it
                    ledger.deleted[record_id] = "acked"
            elif answer.status == 404:
                with ledger.lock:
                    ledger.vanished.append(record_id)
            else:
                with ledger.lock:
                    ledger.unexpected.append(f"DELETE {record_id}: {answer.status}")
            return

    def _put(self, rng: random.Random, name: str, marker: str, conditional: bool) -> None:
        path = f"{BLOCK_URL}/{name}"
        if_match = None
        if conditional:
            current = self.send("GET", path)
            if current is not None and current.status == 200:
                if_match = current.headers.get("ETag")
        records = [
            {
                "id": f"{marker}-{i}",
                "type": "linestring",
                "anntype": "axon",
                "points": [[i, 1, 2], [i + 1, 2, 3]],
            }
            for i in range(rng.randint(1, 400))
        ]
        put = PutRecord(name, marker, records, if_match, time.monotonic())
        with self.ledger.lock:
            self.ledger.puts.append(put)
        headers = {"Content-Type": "text/plain;charset=UTF-8"}
        if if_match is not None:
            headers["If-Match"] = if_match
        # A conditional PUT is sent once: sent again, its own success would make it a 412.
        for _ in range(1 if if_match is not None else 1 + RESENDS):
            answer = self.send("PUT", path, json.dumps(records).encode(), headers)
            if answer is None:
                continue
            if answer.status in (200, 201):
                put.end, put.outcome = time.monotonic(), "acked"
                self.ledger.acked(answer, name)
            elif answer.status == 412 and if_match is not None:
                put.end, put.outcome = time.monotonic(), "refused"
            else:
                with self.ledger.lock:
                    self.ledger.unexpected.append(f"PUT {marker}: {answer.status}")
            return

    def _reader(self, number: int) -> None:
        rng = random.Random(1000 + number)
        names = PATCH_FILES + PUT_FILES
        while not self.stopping.is_set():
            name = rng.choice(names)
            path = f"{BLOCK_URL}/{name}"
            if rng.random() < 0.15:
                listing = self.send("GET", path + "?versions")
                if listing is None or listing.status != 200:
                    continue
                versions = json.loads(listing.body)
                if not versions:
                    continue
                path += f"?version={rng.choice(versions)['version']}"
            start = time.monotonic()
            answer = self.send("GET", path)
            if answer is None:
                continue
            if answer.status == 404:  # not written yet, or a version trimmed meanwhile
                if "?" not in path and self.ledger.first_ack.get(name, start) < start:
                    with self.ledger.lock:
                        self.ledger.missing_reads += 1
                continue
            with self.ledger.lock:
                self.ledger.reads += 1
                if answer.status != 200 or not is_array(answer.body):
                    self.ledger.torn_reads.append(f"{path}: {answer.status} {answer.body[:80]!r}")


def retries_counted(text: str) -> float | None:
    """The sum of the server's retry counters in a ``/metrics`` text (None: it has none).

    Any ``neurotrale_*`` sample whose name says retries, lost races or conflicts, such as
    ``neurotrale_annotation_commit_retries_total``.
    """
    total = None
    for line in text.splitlines():
        match = re.match(
            r"(neurotrale_\w*(?:retr|lost_race|conflict)\w*?)(?:\{[^}]*\})? (\S+)$", line
        )
        if match and not match.group(1).endswith("_created"):
            total = (total or 0.0) + float(match.group(2))
    return total


@dataclass
class Cluster:
    shared: SharedDirectory
    hosts: list[Host]
    proxy: Balancer


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """One directory, two bindfs mounts, a server with 2 workers on each, haproxy in front."""
    if MISSING is not None:
        pytest.fail(f"CI=true, but {MISSING}")
    shared = SharedDirectory(tmp_path)
    hosts: list[Host] = []
    proxy = None
    try:
        write_dataset(shared.source)
        for mount in shared.mounts:
            name = mount.name
            args = ("--keep-versions", str(KEEP_VERSIONS), "--trust-proxy")
            hosts.append(Host(name, mount, tmp_path, *args, workers=2))
        proxy = Balancer(hosts, tmp_path / "haproxy.log")
        yield Cluster(shared, hosts, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        for host in hosts:
            host.stop()
        shared.unmount()


@needs_bindfs
def test_the_mounts_do_not_share_locks(tmp_path: Path) -> None:
    """The setting is the hard one: a lock through one mount does not block the other."""
    if MISSING is not None:
        pytest.fail(f"CI=true, but {MISSING}")
    shared = SharedDirectory(tmp_path)
    try:
        a, b = (mount / ".lock-probe" for mount in shared.mounts)
        assert lock_blocks(a, a), "a lock does not even block another process on one mount"
        assert not lock_blocks(a, b), "the two mounts share locks: not the setting under test"
    finally:
        shared.unmount()


def read_settled(hosts: list[Host], name: str) -> bytes | None:
    """The file as both hosts serve it, once they agree (a mount may cache for a moment)."""

    def agreed() -> tuple[bytes | None] | None:
        bodies = []
        for host in hosts:
            answer = request(host.url, "GET", f"/{DATASET}/annotations/{BLOCK}/{name}")
            assert answer is not None and answer.status in (200, 404), name
            bodies.append(answer.body if answer.status == 200 else None)
        return (bodies[0],) if len(set(bodies)) == 1 else None

    return wait_until(agreed, 10, f"both hosts to serve the same {name}")[0]  # type: ignore[no-any-return]


def check_patched(ledger: Ledger, final: dict[str, bytes | None]) -> dict[str, int]:
    """Compare the PATCH files with what was acknowledged."""
    found: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for name in PATCH_FILES:
        records = json.loads(final[name] or b"[]")
        ids = [r["id"] for r in records]
        duplicates += len(ids) - len(set(ids))
        found.update({r["id"]: {**r, "_file": name} for r in records})
    lost = resurrected = wrong = 0
    for record_id, (name, record, state) in ledger.patched.items():
        present = found.get(record_id)
        if present is not None and {**record, "_file": name} != present:
            wrong += 1
            ledger.suspects.append(record_id)
        elif record_id in ledger.vanished:
            ledger.suspects.append(record_id)  # counted when the DELETE found it gone
        elif ledger.deleted.get(record_id) == "acked" and present is not None:
            resurrected += 1
            ledger.suspects.append(record_id)
        elif state == "acked" and record_id not in ledger.deleted and present is None:
            lost += 1
            ledger.suspects.append(record_id)
    foreign = len(set(found) - set(ledger.patched))
    return {
        "lost": lost,
        "resurrected": resurrected,
        "wrong": wrong + duplicates + foreign,
    }


def check_puts(ledger: Ledger, final: dict[str, bytes | None]) -> dict[str, int]:
    """Compare the PUT files with the PUTs that were sent and answered."""
    overwritten = wrong = lost_updates = 0
    for name in PUT_FILES:
        puts = [p for p in ledger.puts if p.name == name]
        acked = [p for p in puts if p.outcome == "acked"]
        content = final[name]
        if content is None:
            wrong += bool(acked)
            continue
        records = json.loads(content)
        marker = records[0]["id"].rsplit("-", 1)[0] if records else None
        winner = next((p for p in puts if p.marker == marker), None)
        if winner is None or winner.records != records or winner.outcome == "refused":
            wrong += 1
            continue
        # The final body must not predate an acknowledged PUT sent after it was answered.
        overwritten += any(p.start > winner.end for p in acked)
        bases = Counter(p.if_match for p in acked if p.if_match is not None)
        lost_updates += sum(n - 1 for n in bases.values() if n > 1)
    return {"overwritten": overwritten, "wrong": wrong, "lost_updates": lost_updates}


def check_versions(ledger: Ledger, host: Host) -> tuple[int, list[str]]:
    """Every kept version of every file: how many at most, and what is wrong with them."""
    problems = []
    most = 0
    sent_puts = {p.marker: p.records for p in ledger.puts}
    for name in PATCH_FILES + PUT_FILES:
        base = f"/{DATASET}/annotations/{BLOCK}/{name}"
        listing = request(host.url, "GET", base + "?versions")
        assert listing is not None and listing.status == 200, name
        versions = json.loads(listing.body)
        most = max(most, len(versions))
        for entry in versions:
            answer = request(host.url, "GET", f"{base}?version={entry['version']}")
            where = f"{name} version {entry['version']}"
            if answer is None or answer.status != 200 or not is_array(answer.body):
                problems.append(f"{where}: {answer and answer.status} not a whole JSON array")
                continue
            records = json.loads(answer.body)
            if name in PUT_FILES and records:
                if sent_puts.get(records[0]["id"].rsplit("-", 1)[0]) != records:
                    problems.append(f"{where}: a body nobody sent")
            elif name in PATCH_FILES:
                ids = [r["id"] for r in records]
                if len(ids) != len(set(ids)) or any(
                    ledger.patched.get(r["id"], (None, None))[1] != r for r in records
                ):
                    problems.append(f"{where}: records nobody sent, or twice")
    return most, problems


@needs_bindfs
def test_two_hosts_lose_nothing_under_concurrency_and_kill_storms(cluster: Cluster) -> None:
    hosts, proxy = cluster.hosts, cluster.proxy
    # The hard setting, proved on these very mounts: each host's locks are its own.
    a, b = (mount / ".lock-probe" for mount in cluster.shared.mounts)
    assert lock_blocks(a, a) and not lock_blocks(a, b), "the mounts share locks"

    ledger = Ledger()
    clients = Clients(proxy.url, ledger)
    clients.start()
    retries = 0.0
    retry_counter_seen = False

    def count_retries(host: Host) -> None:
        nonlocal retries, retry_counter_seen
        value = retries_counted(host.metrics())
        if value is not None:
            retries += value
            retry_counter_seen = True

    rng = random.Random(15)
    kills = Counter[str]()
    try:
        time.sleep(CALM_SECONDS)
        ledger.storm = True
        deadline = time.monotonic() + STORM_SECONDS
        for index, kind in KILLS:
            if time.monotonic() > deadline:
                break
            time.sleep(rng.uniform(0.4, 1.2))
            host = hosts[index]
            if kind == "worker":
                kills["worker"] += host.kill_worker(rng.choice)
            else:
                count_retries(host)  # its counters go with it
                host.kill_parent_and_restart()
                kills["parent"] += 1
        time.sleep(2)  # both hosts up again: writes settle
    finally:
        clients.stop()
    for host in hosts:
        wait_until(host.metrics, 30, f"{host.name} to answer")
        count_retries(host)

    final = {name: read_settled(hosts, name) for name in PATCH_FILES + PUT_FILES}
    patched = check_patched(ledger, final)
    puts = check_puts(ledger, final)
    most_versions, version_problems = check_versions(ledger, hosts[0])
    lost = (
        patched["lost"]
        + patched["resurrected"]
        + len(ledger.vanished)
        + puts["overwritten"]
        + puts["lost_updates"]
    )
    figures = (
        f"multihost: writes acknowledged={ledger.acknowledged} "
        f"(by host {dict(ledger.acknowledged_by_host)}), lost={lost} "
        f"(PATCH records missing={patched['lost']}, acknowledged DELETE undone="
        f"{patched['resurrected']}, DELETE found acknowledged record gone={len(ledger.vanished)}, "
        f"PUT file older than an acknowledged PUT={puts['overwritten']}, "
        f"If-Match lost updates={puts['lost_updates']}), wrong content="
        f"{patched['wrong'] + puts['wrong']}, 5xx={len(ledger.server_errors)} "
        f"(+ haproxy's own while calm={ledger.proxy_errors_calm}, during kills="
        f"{ledger.proxy_errors_storm}), unanswered={ledger.no_answer}, reads={ledger.reads}, "
        f"torn reads={len(ledger.torn_reads)}, GET 404 of a written file={ledger.missing_reads}, "
        f"versions at most={most_versions} "
        f"(keep {KEEP_VERSIONS}), bad versions={len(version_problems)}, retries="
        f"{retries if retry_counter_seen else 'n/a (no counter in /metrics)'}, kills survived="
        f"{kills['worker']} workers + {kills['parent']} parents"
    )
    print(figures)
    details = "\n".join(
        [
            figures,
            *ledger.server_errors[:5],
            *ledger.unexpected[:5],
            *ledger.torn_reads[:5],
            *version_problems[:5],
            *(f"{r}: {'; '.join(ledger.history.get(r, []))}" for r in ledger.suspects[:4]),
        ]
    )
    assert lost == 0, details
    assert patched["wrong"] + puts["wrong"] == 0, details
    assert ledger.server_errors == [], details
    assert ledger.unexpected == [], details
    assert ledger.proxy_errors_calm == 0, details
    assert ledger.torn_reads == [], details
    assert version_problems == [], details
    assert most_versions <= KEEP_VERSIONS + VERSION_SLACK, details
    # The run was what it claims: both hosts took writes, and the kills happened.
    assert ledger.acknowledged >= 100, details
    assert all(ledger.acknowledged_by_host[f"host-{h}"] >= 20 for h in "ab"), details
    assert kills["parent"] >= 2 and kills["worker"] >= 3, details


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed (apt-get install systemd)",
)
def test_the_systemd_drop_in_verifies(tmp_path: Path) -> None:
    """contrib/multihost/neurotrale-shared.conf over contrib/systemd's units: no complaint."""
    assert SYSTEMD_ANALYZE, "systemd-analyze is missing (apt-get install systemd)"
    twistd = str(Path(sys.executable).parent / "twistd")
    shared = tmp_path / "shared"
    shared.mkdir()
    units = REPO / "contrib" / "systemd"
    for name in ("neurotrale.service", "neurotrale.socket"):
        text = (units / name).read_text().replace("/opt/neurotrale/venv/bin/twistd", twistd)
        (tmp_path / name).write_text(text)
    drop_in = tmp_path / "neurotrale.service.d"
    drop_in.mkdir()
    text = (REPO / "contrib" / "multihost" / "neurotrale-shared.conf").read_text()
    text = text.replace("/opt/neurotrale/venv/bin/twistd", twistd)
    (drop_in / "shared.conf").write_text(text.replace("/shared/neurotrale", str(shared)))
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "verify",
            str(tmp_path / "neurotrale.socket"),
            str(tmp_path / "neurotrale.service"),
        ],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The drop-in is read: a broken copy of it is reported.
    (drop_in / "shared.conf").write_text(text + "not a setting\n")
    broken = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(tmp_path / "neurotrale.service")],
        capture_output=True,
        text=True,
    )
    assert "shared.conf" in broken.stdout + broken.stderr
    settings = [line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"]
    exec_start = [value for key, value in settings if key == "ExecStart"]
    assert exec_start[0] == "" and "--path /shared/neurotrale" in exec_start[1]
    assert "--trust-proxy" in exec_start[1]
    assert ("RequiresMountsFor", "/shared/neurotrale") in [tuple(kv) for kv in settings]
    assert ("ReadWritePaths", "/shared/neurotrale") in [tuple(kv) for kv in settings]
