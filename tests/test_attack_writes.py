"""Attacks on the annotation write path through a real ``twistd neurotrale`` (issues 11, 15).

Each test does to a served annotation file what a person, a crash or another writer might
(edit it in place on disk, truncate it, race writers on it) and checks what a client sees
over HTTP: every acknowledged change present, what was replaced kept as a version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from .test_e2e import Twistd
from .test_workers import start
from .test_write_races import point, request, serving

__all__ = ["start"]  # the fixture, imported for pytest

DATASET = "demo-brain"
FILE = f"{DATASET}/annotations/x0y0z0/attack.json"


def body(records: list[dict[str, object]]) -> bytes:
    return json.dumps(records).encode()


def ids(content: bytes) -> list[str]:
    return [str(r["id"]) for r in json.loads(content)]


def kept_versions(url: str) -> list[list[str] | None]:
    """The ids of every listed version of FILE, newest first, fetched one by one (None for
    an empty file)."""
    status, listing = request(f"{url}/{FILE}?versions", "GET")
    assert status == 200, listing
    found = []
    for entry in json.loads(listing):
        status, content = request(f"{url}/{FILE}?version={entry['version']}", "GET")
        assert status == 200, content
        found.append(ids(content) if content else None)
    return found


def test_an_edit_in_place_on_disk_never_rewrites_the_history(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    """``cp backup.json fibers.json`` and ``truncate`` write into the published file's inode.

    The server's content it replaced must stay restorable as a version, and the versions
    already listed must keep their content (they were hard links of the published file).
    """
    server = serving(start, data_root, tmp_path / "server.log", workers=1)
    url = server.url
    assert request(f"{url}/{FILE}", "PUT", body([point("a")]))[0] in (200, 201)
    assert request(f"{url}/{FILE}", "PUT", body([point("a"), point("b")]))[0] == 200
    assert kept_versions(url) == [["a"]]
    path = data_root / FILE
    with open(path, "r+b") as edited:  # as cp onto an existing file, or an editor, does
        edited.truncate(0)
        edited.write(body([point("by-hand")]))
    status, content = request(f"{url}/{FILE}", "GET")
    assert (status, ids(content)) == (200, ["by-hand"])
    assert request(f"{url}/{FILE}", "PATCH", body(point("c")))[0] == 200
    status, content = request(f"{url}/{FILE}", "GET")
    assert ids(content) == ["by-hand", "c"]
    # The server's content the edit replaced, then what came before, each restorable.
    assert kept_versions(url) == [["by-hand"], ["a", "b"], ["a"]]
    os.truncate(path, 0)  # truncated on disk: an empty file, kept; nothing else touched
    assert request(f"{url}/{FILE}", "PUT", body([point("d")]))[0] == 200
    assert kept_versions(url) == [None, ["by-hand", "c"], ["by-hand"], ["a", "b"], ["a"]]


def canonical(records: list[dict[str, object]]) -> bytes:
    return json.dumps(records, separators=(",", ":")).encode()


def test_an_edit_on_disk_already_committed_is_not_committed_again_over_newer_work(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    """Hosts A and B share the file; a person edited it on disk. A committed the edit as
    entry 2 (and its own change as 3), B's change is entry 4, neither has published yet:
    the published file is still the edit itself (its own inode). It is behind, not a new
    edit: a reader sees entry 4 and the next write builds on it (it re-committed the edit
    on top, dropping A's and B's changes)."""
    server = serving(start, data_root, tmp_path / "server.log", workers=1)
    url = server.url
    assert request(f"{url}/{FILE}", "PUT", body([point("a")]))[0] in (200, 201)
    path = data_root / FILE
    log = path.parent / ".log" / path.name
    edit = [point("by-hand")]
    (log / "2.json").write_bytes(canonical(edit))
    (log / "3.json").write_bytes(canonical([*edit, point("from-A")]))
    (log / "4.json").write_bytes(canonical([*edit, point("from-A"), point("from-B")]))
    edited = path.with_name("edited")
    edited.write_bytes(canonical(edit))
    os.rename(edited, path)
    status, content = request(f"{url}/{FILE}", "GET")
    assert (status, ids(content)) == (200, ["by-hand", "from-A", "from-B"])
    assert request(f"{url}/{FILE}", "PATCH", body(point("c")))[0] == 200
    status, content = request(f"{url}/{FILE}", "GET")
    assert ids(content) == ["by-hand", "from-A", "from-B", "c"]
    assert ids(path.read_bytes()) == ["by-hand", "from-A", "from-B", "c"]


#: A writer in its own process that SIGKILLs itself at the Nth filesystem change of its
#: write (before or after it): argv = root, keep_versions, kill_at, before|after, method, id.
KILLED_WRITER = r"""
import os, signal, sys
from neurotrale_twisted.core import rootfs
from neurotrale_twisted.core.annotations.store import AnnotationStore
from neurotrale_twisted.core.paths import DataRoot

root, keep, kill_at, when, method, rid = sys.argv[1:]
kill_at = int(kill_at)
calls = 0

def hook(name):
    real = getattr(rootfs.Directory, name)

    def changed(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(self, *args, **kwargs)
        if calls == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(rootfs.Directory, name, changed)

for name in ("create_exclusive", "link", "rename", "remove", "sync", "set_modified",
             "make_subdir"):
    if hasattr(rootfs.Directory, name):
        hook(name)
data = DataRoot(root)
store = AnnotationStore(data, keep_versions=int(keep))
path = store.locate(data.root / "demo-brain", "x0y0z0", "attack.json", for_write=True)
body = ('{"id": "%s", "type": "point", "point": [1, 2, 3]}' % rid).encode()
if method == "PATCH":
    store.patch(path, body, None)
else:
    store.put(path, b"[" + body + b"]")
print(calls)
"""


def killed_writer(root: Path, keep: int, kill_at: int, when: str, method: str, rid: str) -> int:
    """Run a writer that kills itself at step ``kill_at``; its exit status."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_WRITER,
            str(root),
            str(keep),
            str(kill_at),
            when,
            method,
            rid,
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


@pytest.mark.parametrize("keep", [0, 1, 20])
def test_a_writer_killed_at_every_step_loses_nothing_acknowledged(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path, keep: int
) -> None:
    """A writer process is SIGKILLed before and after each change it makes to the disk, in
    turn, while a PATCH of the file it writes is under way (now and then on a file edited on
    disk, and a PUT); a real server then serves every acknowledged record, whole, the killed
    write whole or not at all, and its next write repairs and leaves no temporary."""
    server = serving(
        start, data_root, tmp_path / "server.log", f"--keep-versions={keep}", workers=1
    )
    url = server.url
    path = data_root / FILE
    log = path.parent / ".log" / path.name
    assert request(f"{url}/{FILE}", "PUT", body([point("seed")]))[0] == 201
    acknowledged = ["seed"]
    attempts = killed = 0
    for when in ("before", "after"):
        for method, edit in (("PATCH", False), ("PATCH", True), ("PUT", False)):
            kill_at = 1
            while True:
                if edit:  # a person replaced the file on disk since the last write
                    status, content = request(f"{url}/{FILE}", "GET")
                    edited = path.with_name("edited")
                    edited.write_bytes(canonical([*json.loads(content), point(f"e{attempts}")]))
                    os.rename(edited, path)
                    acknowledged.append(f"e{attempts}")
                rid = f"k{attempts}"
                attempts += 1
                rc = killed_writer(data_root, keep, kill_at, when, method, rid)
                status, content = request(f"{url}/{FILE}", "GET")
                assert status == 200, content
                seen = ids(content)
                if method == "PUT":
                    assert seen in ([rid], acknowledged), (when, kill_at, seen)
                    if rc == 0 or seen == [rid]:
                        acknowledged = [rid]
                else:
                    assert seen in (acknowledged, [*acknowledged, rid]), (when, kill_at, seen)
                    if rc == 0 or rid in seen:
                        acknowledged.append(rid)
                listing_status, listing = request(f"{url}/{FILE}?versions", "GET")
                assert listing_status == 200
                assert len(json.loads(listing)) <= keep
                for entry in json.loads(listing):
                    status, old = request(f"{url}/{FILE}?version={entry['version']}", "GET")
                    assert status == 200 and len(json.loads(old)) == entry["count"]
                # The next writer (the server) repairs, and cleans up after the dead one.
                repair = f"r{attempts}"
                assert request(f"{url}/{FILE}", "PATCH", body(point(repair)))[0] == 200
                acknowledged.append(repair)
                status, content = request(f"{url}/{FILE}", "GET")
                assert ids(content) == acknowledged, (when, kill_at)
                assert ids(path.read_bytes()) == acknowledged
                assert not [n for n in os.listdir(log) if n.startswith(".tmp-")]
                if rc == 0:
                    break
                killed += 1
                kill_at += 1
    print(f"\nkilled writer, keep {keep}: attempts={attempts} killed={killed} lost=0")


def exchange_headers(
    url: str, method: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP request: (status, body, headers with lower-case names)."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return (
                response.status,
                response.read(),
                {k.lower(): v for k, v in response.headers.items()},
            )
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def test_each_write_answers_the_etag_a_read_gives_and_a_stray_put_is_undone_by_one_put(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    server = serving(start, data_root, tmp_path / "server.log", workers=2)
    url = f"{server.url}/{FILE}"
    missing = exchange_headers(url, "PUT", body([point("a")]), {"If-Match": "*"})
    assert missing[0] == 412 and json.loads(missing[1])["status"] == 412
    writes = [
        ("PUT", url, body([point("a"), point("b")])),
        ("PATCH", url, body(point("c"))),
        ("DELETE", f"{url}?id=a", None),
        ("PUT", url, body([point("b"), point("c"), point("d")])),
    ]
    for method, target, data in writes:
        status, _, answered = exchange_headers(target, method, data)
        assert status in (200, 201)
        status, content, got = exchange_headers(url, "GET")
        assert status == 200 and answered["etag"] == got["etag"]
        assert exchange_headers(url, "GET", headers={"If-None-Match": got["etag"]})[0] == 304
    etag = got["etag"]
    for refused in (f"W/{etag}", '"nope"', etag.strip('"'), f'"x" , W/{etag}'):
        status, content, _ = exchange_headers(url, "PATCH", body(point("z")), {"If-Match": refused})
        assert status == 412 and json.loads(content)["status"] == 412, refused
    assert ids(exchange_headers(url, "GET")[1]) == ["b", "c", "d"]
    # A stray PUT [] (with a list If-Match naming the current tag) ...
    status, _, _ = exchange_headers(url, "PUT", b"[]", {"If-Match": f'"x", {etag}'})
    assert status == 200
    assert exchange_headers(url, "GET")[1] == b"[]"
    # ... is undone by one more PUT of the version it replaced.
    listing = json.loads(exchange_headers(f"{url}?versions", "GET")[1])
    newest = listing[0]
    assert newest["count"] == 3 and [v["version"] for v in listing] == sorted(
        (v["version"] for v in listing), reverse=True
    )
    old = exchange_headers(f"{url}?version={newest['version']}", "GET")[1]
    assert exchange_headers(url, "PUT", old, {"If-Match": "*"})[0] == 200
    assert ids(exchange_headers(url, "GET")[1]) == ["b", "c", "d"]
    for entry in json.loads(exchange_headers(f"{url}?versions", "GET")[1]):
        content = exchange_headers(f"{url}?version={entry['version']}", "GET")[1]
        assert (len(content), len(json.loads(content))) == (entry["size"], entry["count"])


#: A writer whose every publish finds the disk full (the commit fits, the copy does not), as
#: on a disk whose free space lies between one and two copies of the file while each commit
#: trims an older entry: argv = root, keep_versions, writes.
UNPUBLISHED_WRITER = r"""
import errno, sys
from neurotrale_twisted.core.annotations import commitlog
from neurotrale_twisted.core.annotations.store import AnnotationStore
from neurotrale_twisted.core.paths import DataRoot

def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

commitlog.History._publish_copy = full
root, keep, writes = sys.argv[1:]
data = DataRoot(root)
store = AnnotationStore(data, keep_versions=int(keep))
path = store.locate(data.root / "demo-brain", "x0y0z0", "attack.json", for_write=True)
for i in range(int(writes)):
    store.patch(path, ('{"id": "u%d", "type": "point", "point": [1, 2, 3]}' % i).encode(), None)
"""


@pytest.mark.parametrize("keep", [0, 1])
def test_commits_whose_publishing_keeps_failing_stay_the_content(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path, keep: int
) -> None:
    """Every write is acknowledged (its commit is durable) but the published file stays
    the first one: however far behind it falls, it is never taken for an edit made on disk
    (that made the next write commit it over every acknowledged change since)."""
    server = serving(
        start, data_root, tmp_path / "server.log", f"--keep-versions={keep}", workers=1
    )
    url = server.url
    assert request(f"{url}/{FILE}", "PUT", body([point("seed")]))[0] == 201
    writes = 2 * 8 + 3
    done = subprocess.run(
        [sys.executable, "-c", UNPUBLISHED_WRITER, str(data_root), str(keep), str(writes)],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    acknowledged = ["seed", *(f"u{i}" for i in range(writes))]
    assert ids((data_root / FILE).read_bytes()) == ["seed"]  # never published
    status, content = request(f"{url}/{FILE}", "GET")
    assert (status, ids(content)) == (200, acknowledged)
    assert request(f"{url}/{FILE}", "PATCH", body(point("next")))[0] == 200
    assert ids(request(f"{url}/{FILE}", "GET")[1]) == [*acknowledged, "next"]
    assert ids((data_root / FILE).read_bytes()) == [*acknowledged, "next"]


#: A writer that stalls just before it renames its copy over the published file (an NFS
#: client hung there, on another host: its lock is not shared) until ``release`` exists,
#: renames, and dies before it rolls forward:
#: argv = root, keep_versions, stalled (a file it makes once stalled), release.
STALLED_WRITER = r"""
import os, signal, sys, time
from pathlib import Path
from neurotrale_twisted.core import rootfs
from neurotrale_twisted.core.annotations.store import AnnotationStore
from neurotrale_twisted.core.paths import DataRoot

root, keep, stalled, release = sys.argv[1:]
real = rootfs.Directory.rename

def rename(self, source, target, target_dir=None):
    Path(stalled).touch()
    while not Path(release).exists():
        time.sleep(0.01)
    real(self, source, target, target_dir)
    os.kill(os.getpid(), signal.SIGKILL)

rootfs.Directory.rename = rename
import contextlib
from neurotrale_twisted.core.annotations import store as store_module
store_module.same_host_lock = lambda block, name: contextlib.nullcontext()  # another host
data = DataRoot(root)
store = AnnotationStore(data, keep_versions=int(keep))
path = store.locate(data.root / "demo-brain", "x0y0z0", "attack.json", for_write=True)
store.patch(path, b'{"id": "slow", "type": "point", "point": [1, 2, 3]}', None)
"""


def test_a_writer_stalled_past_the_kept_log_publishes_late_and_dies(
    start: Callable[..., Twistd], data_root: Path, tmp_path: Path
) -> None:
    server = serving(start, data_root, tmp_path / "server.log", "--keep-versions=0", workers=1)
    url = server.url
    assert request(f"{url}/{FILE}", "PUT", body([point("seed")]))[0] == 201
    stalled, release = tmp_path / "stalled", tmp_path / "release"
    writer = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER, str(data_root), "0", str(stalled), str(release)]
    )
    try:
        for _ in range(3000):
            if stalled.exists() or writer.poll() is not None:
                break
            time.sleep(0.01)
        assert stalled.exists()
        acknowledged = ["seed", "slow"]
        for i in range(12):
            assert request(f"{url}/{FILE}", "PATCH", body(point(f"p{i}")))[0] == 200
            acknowledged.append(f"p{i}")
        release.touch()
        assert writer.wait(60) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
    assert ids((data_root / FILE).read_bytes()) == ["seed", "slow"]  # published late
    assert ids(request(f"{url}/{FILE}", "GET")[1]) == acknowledged
