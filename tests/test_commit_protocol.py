"""The commit protocol (docs/commit-protocol.md), state by state, as a user sees it.

Each test builds on disk the state a crash or a race at one step of the protocol leaves (a
commit not yet published, a slow writer that published an older commit over a newer one, an
edit made by hand, the layout of the code before the log, temporaries of dead writers), then
checks what a read serves and what the next write keeps. The last one runs writers with the
same-host lock switched off, as on hosts whose locks are not shared: only the protocol keeps
every record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from neurotrale_twisted.core.annotations import commitlog
from neurotrale_twisted.core.annotations import store as store_module
from neurotrale_twisted.core.errors import Unavailable
from neurotrale_twisted.core.rootfs import temporary_name

from .test_annotations import Site, canonical, point


def entry(path: Path, number: int) -> Path:
    return path.parent / ".log" / path.name / f"{number}.json"


def commit_by_hand(path: Path, number: int, records: list[dict[str, object]]) -> None:
    """What a writer that died right after its commit (step 7) leaves: an entry, unpublished."""
    entry(path, number).write_bytes(canonical(records))


def test_a_commit_not_yet_published_is_served_and_built_on(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical([point("a")]))
    commit_by_hand(path, 2, [point("a"), point("b")])
    assert json.loads(path.read_bytes()) == [point("a")]  # the file on disk lags
    assert json.loads(site.store.read(path).content) == [point("a"), point("b")]
    site.store.patch(path, canonical(point("c")), None)
    assert json.loads(path.read_bytes()) == [point("a"), point("b"), point("c")]
    assert [v["version"] for v in site.store.versions(path)] == [2, 1]


def test_a_slow_writer_publishing_an_older_commit_loses_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    for i in range(3):
        site.store.patch(path, canonical(point(f"r{i}")), None)
    # The writer of 2 publishes after the writer of 3, and dies before rolling forward.
    spare = path.parent / ".spare"
    os.link(entry(path, 2), spare)
    os.rename(spare, path)
    assert len(json.loads(path.read_bytes())) == 2
    assert [r["id"] for r in json.loads(site.store.read(path).content)] == ["r0", "r1", "r2"]
    site.store.patch(path, canonical(point("r3")), None)
    assert [r["id"] for r in json.loads(path.read_bytes())] == ["r0", "r1", "r2", "r3"]
    # An identical write repairs a lagging file too, and makes no version.
    os.link(entry(path, 3), spare)
    os.rename(spare, path)
    site.store.patch(path, canonical(point("r3")), None)
    assert [r["id"] for r in json.loads(path.read_bytes())] == ["r0", "r1", "r2", "r3"]
    assert [v["version"] for v in site.store.versions(path)] == [3, 2, 1]


@pytest.mark.parametrize("keep_versions", [0, 3])
def test_a_copy_of_an_entry_trimmed_long_ago_is_still_behind(
    tmp_path: Path, keep_versions: int
) -> None:
    """A slow writer's copy of entry 2 published after 20 more commits, when entry 2 is
    gone from the log and the versions: its mark says it is the server's copy, so the
    head is served and built on, not the stale copy taken for an edit made on disk."""
    site = Site(tmp_path, keep_versions=keep_versions)
    path = site.locate("x0y0z0", write=True)
    site.store.patch(path, canonical(point("r0")), None)
    site.store.patch(path, canonical(point("r1")), None)
    stale = path.parent / ".stale"
    stale.write_bytes(entry(path, 2).read_bytes())
    status = entry(path, 2).stat()
    os.utime(stale, ns=(status.st_mtime_ns, status.st_mtime_ns))  # as _publish_copy does
    for i in range(2, 22):
        site.store.patch(path, canonical(point(f"r{i}")), None)
    assert not entry(path, 2).exists()
    assert not (path.parent / ".versions" / path.name / "2.json").exists()
    os.rename(stale, path)
    wanted = [f"r{i}" for i in range(22)]
    assert [r["id"] for r in json.loads(site.store.read(path).content)] == wanted
    site.store.patch(path, canonical(point("r22")), None)
    assert [r["id"] for r in json.loads(path.read_bytes())] == [*wanted, "r22"]


def test_marks_of_trimmed_entries_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One mark per entry trimmed from the log, and none more than MARKS_KEEP behind the head
    once the head passes a multiple of MARKS_TRIM_EVERY."""
    monkeypatch.setattr(commitlog, "MARKS_KEEP", 10)
    monkeypatch.setattr(commitlog, "MARKS_TRIM_EVERY", 5)
    site = Site(tmp_path, keep_versions=2)
    path = site.locate("x0y0z0", write=True)
    for i in range(40):
        site.store.patch(path, canonical(point(f"r{i}")), None)
    marks = path.parent / ".log" / path.name / commitlog.MARKS_DIR
    numbers = sorted(int(name.split("-")[0]) for name in os.listdir(marks))
    # Head 40: the log keeps 32..40 (the versions 38 and 39, links of two of them), so 1..31
    # were trimmed and marked; the marks below 40 - 10 went when the head reached 40.
    assert numbers == list(range(30, 32))
    for name in os.listdir(marks):
        assert commitlog.MARK.match(name) and (marks / name).stat().st_size == 0


def test_an_edit_made_by_hand_is_kept_and_so_is_what_it_replaced(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical([point("server")]))
    site.store.put(path, canonical([point("server"), point("two")]))
    edited = path.parent / "edited"
    edited.write_bytes(canonical([point("by-hand")]))
    os.rename(edited, path)  # an editor saving by rename: a new inode
    assert json.loads(site.store.read(path).content) == [point("by-hand")]
    site.store.patch(path, canonical(point("after")), None)
    assert json.loads(path.read_bytes()) == [point("by-hand"), point("after")]
    listing = site.store.versions(path)
    assert [v["version"] for v in listing] == [3, 2, 1]
    assert json.loads(site.store.read_version(path, 3).content) == [point("by-hand")]
    assert json.loads(site.store.read_version(path, 2).content) == [point("server"), point("two")]


def test_a_file_deleted_by_hand_keeps_its_committed_records(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical([point("a")]))
    path.unlink()
    assert json.loads(site.store.read(path).content) == [point("a")]
    site.store.patch(path, canonical(point("b")), None)
    assert json.loads(path.read_bytes()) == [point("a"), point("b")]


def test_the_layout_before_the_log_is_taken_over_with_its_versions(tmp_path: Path) -> None:
    site = Site(tmp_path)
    block = site.ann / "x0y0z0"
    versions = block / ".versions" / "fibers.json"
    versions.mkdir(parents=True)
    for n in (1, 2):
        (versions / f"{n}.json").write_bytes(canonical([point(f"old{n}")]))
    path = block / "fibers.json"
    path.write_bytes(canonical([point("current")]))
    assert [v["version"] for v in site.store.versions(path)] == [2, 1]
    site.store.patch(path, canonical(point("new")), None)
    assert json.loads(path.read_bytes()) == [point("current"), point("new")]
    assert [v["version"] for v in site.store.versions(path)] == [3, 2, 1]
    assert json.loads(site.store.read_version(path, 3).content) == [point("current")]


def test_temporaries_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, b"[]")
    log = path.parent / ".log" / path.name
    dead_pid = 2**22 + 17  # above pid_max's default: no such process
    mine = temporary_name(path.name)
    dead = mine.replace(f".{os.getpid()}.", f".{dead_pid}.")
    other_host = f".tmp-{path.name}.elsewhere.{os.getpid()}.1.0123456789ab"
    old_other = f".tmp-{path.name}.elsewhere.1.1.ba9876543210"
    for name in (dead, other_host, old_other):
        (log / name).write_bytes(b"[")
    os.utime(log / old_other, (time.time() - 3600, time.time() - 3600))
    site.store.put(path, canonical([point("a")]))
    left = sorted(n for n in os.listdir(log) if n.startswith(".tmp-"))
    assert left == [other_host]


@contextlib.contextmanager
def no_lock(block: object, name: str) -> Iterator[None]:
    yield


def test_without_the_same_host_lock_the_log_alone_keeps_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "same_host_lock", no_lock)
    site = Site(tmp_path, keep_versions=4)
    path = site.locate("x0y0z0", write=True)
    writers, per_writer = 6, 30
    errors: list[BaseException] = []
    start = threading.Barrier(writers)
    lost_before = commitlog.lost_races.value

    def write(w: int) -> None:
        store = store_module.AnnotationStore(site.root, keep_versions=4)
        start.wait()
        try:
            for i in range(per_writer):
                store.patch(path, canonical(point(f"w{w}-{i}")), None)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = {r["id"] for r in json.loads(path.read_bytes())}
    races = commitlog.lost_races.value - lost_before
    print(f"\nno lock: writers={writers} records={len(ids)} lost races retried={races}")
    assert errors == []
    assert len(ids) == writers * per_writer
    assert len(site.store.versions(path)) == 4
    assert not [n for n in os.listdir(path.parent / ".log" / path.name) if n.startswith(".tmp-")]


def test_a_write_that_keeps_losing_races_is_503_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical([point("a")]))
    site.store.put(path, canonical([point("a"), point("b")]))
    real_commit = commitlog.History.commit

    def always_beaten(
        self: commitlog.History, content: bytes, number: int, check: Callable[[], None]
    ) -> None:
        # Another writer commits this very number first, every time.
        commit_by_hand(path, number, [point("other"), point(str(number))])
        real_commit(self, content, number, check)

    monkeypatch.setattr(commitlog.History, "commit", always_beaten)
    with pytest.raises(Unavailable) as refused:
        site.store.patch(path, canonical(point("c")), None)
    assert refused.value.status == 503 and "try again" in refused.value.message
    log = path.parent / ".log" / path.name
    assert not [n for n in os.listdir(log) if n.startswith(".tmp-")]
    # Every attempt re-read the newest commit: what is there now is the other writer's last.
    last = max(int(n.split(".")[0]) for n in os.listdir(log) if not n.startswith("."))
    assert last == 2 + commitlog.MAX_ATTEMPTS
    assert json.loads(site.store.read(path).content) == [point("other"), point(str(last))]


@contextlib.contextmanager
def vanishing_once(
    monkeypatch: pytest.MonkeyPatch, name: str, times: int = 1
) -> Iterator[list[int]]:
    """``fstat`` of a just-opened file called ``name`` fails with ``ENOENT`` ``times`` times,
    as on a FUSE file system (bindfs) or NFS when another host renames a new copy over it
    between its open and its status. Yields the list of the failures made."""
    real_fstat = os.fstat
    made: list[int] = []

    def fstat(fd: int) -> os.stat_result:
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = ""
        if len(made) < times and opened.endswith(f"/{name}"):
            made.append(fd)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    yield made


@pytest.mark.parametrize("times", [1, 3, 5])
def test_a_published_copy_vanishing_as_it_is_opened_is_looked_at_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int
) -> None:
    """CI saw a PATCH answer 500 "No such file or directory" on two hosts over bindfs: the
    published copy, renamed over by the other host, vanished between its open and its
    fstat. A write and a read look again instead; no record is lost."""
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical([point("a")]))
    with vanishing_once(monkeypatch, path.name, times) as made:
        site.store.patch(path, canonical(point("b")), None)
    assert len(made) == times
    with vanishing_once(monkeypatch, path.name, times) as made:
        assert json.loads(site.store.read(path).content) == [point("a"), point("b")]
    assert len(made) == times
    assert json.loads(path.read_bytes()) == [point("a"), point("b")]


def test_a_head_entry_that_cannot_be_read_for_a_moment_is_never_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The multihost storm lost an If-Match update once: on bindfs, a log entry another
    writer had just linked could not be read for a moment (its ``fstat`` said ENOENT), the
    state fell back to the entry before it, and the write, its number being free, committed
    on content that lacked the newest change. The head is looked at again instead."""
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical([point("a")]))
    site.store.patch(path, canonical(point("b")), None)
    before = site.store.read(path).etag
    # Another host's writer committed entry 3 and has not published it yet.
    commit_by_hand(path, 3, [point("a"), point("b"), point("x")])
    with vanishing_once(monkeypatch, "3.json", times=5) as made:
        site.store.patch(path, canonical(point("c")), None)
    assert len(made) == 5
    assert [r["id"] for r in json.loads(path.read_bytes())] == ["a", "b", "x", "c"]
    # An If-Match based on the content before entry 3 is refused, entry 3 unreadable or not.
    commit_by_hand(path, 5, [point("y")])
    with (
        vanishing_once(monkeypatch, "5.json", times=5),
        pytest.raises(store_module.PreconditionFailed),
    ):
        site.store.put(path, canonical([point("z")]), if_match=before)
    assert [r["id"] for r in json.loads(site.store.read(path).content)] == ["y"]
