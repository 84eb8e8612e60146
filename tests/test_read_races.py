"""Reads attacked by people with write access to the data root, through ``twistd neurotrale``.

Someone who can write to the data root (a lab's shared folder) plants FIFOs, sockets and
devices where the server expects files, and swaps a dataset directory for a symbolic link to
a directory outside the root while requests run. Whatever they do, a read answers from inside
the root or not at all (404), and no request blocks the server.
"""

from __future__ import annotations

import ctypes
import errno
import http.client
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.support import write_chunk, write_info

from .test_e2e import Twistd

PLAIN_CHUNK = "/brain/1_1_1/0-8_0-8_0-2"  # uncompressed: answered by one pread
PACKED_CHUNK = "/brain/1_1_1/8-16_0-8_0-2"  # zlib: decoded by tifffile
INSIDE, OUTSIDE = 1, 0xBEEF
#: Bytes only the outside copy of the dataset holds: its voxels, its notes, its file names.
LEAKS = (np.full(2, OUTSIDE, "<u2").tobytes(), b"OUTSIDE", b"outside-only")


def make_dataset(directory: Path, value: int, marker: str) -> None:
    """A dataset ``brain`` of two chunks filled with ``value``, and files naming ``marker``."""
    write_info(directory, (16, 8, 2))
    info = json.loads((directory / "info").read_text())
    (directory / "info").write_text(json.dumps({**info, "marker": marker}))
    volume = np.full((2, 8, 8), value, "uint16")
    write_chunk(directory, "1_1_1", (0, 8, 0, 8, 0, 2), volume)
    write_chunk(directory, "1_1_1", (8, 16, 0, 8, 0, 2), volume, compression="zlib")
    (directory / "notes.txt").write_text(f"notes of {marker}")


@dataclass
class Fenced:
    """A data root holding ``brain``, beside an outside copy of it that must never be served."""

    root: Path
    outside: Path


@pytest.fixture
def fenced(tmp_path: Path) -> Fenced:
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_dataset(root / "brain", INSIDE, "inside")
    make_dataset(outside / "brain", OUTSIDE, "OUTSIDE")
    (outside / "brain" / "outside-only.txt").write_text("x")
    return Fenced(root, outside)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """Start ``twistd neurotrale`` on a root; stop it afterwards, killing it if it hangs."""
    started: list[Twistd] = []

    def run(root: Path, *args: str) -> Twistd:
        server = Twistd(root, tmp_path / f"server-{len(started)}.log", *args)
        started.append(server)
        # Its log also goes to stdout, a pipe: drain it, or thousands of requests fill it.
        out = server.process.stdout
        assert out is not None
        threading.Thread(target=lambda: out.read(), daemon=True).start()
        return server

    yield run
    for server in started:
        try:
            server.stop()
        except Exception:
            server.process.kill()
            server.process.wait()


def get(url: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` on a new connection; the status and body (a timeout raises)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_healthy(url: str) -> None:
    status, body = get(url, "/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")


def test_fifos_sockets_and_devices_are_404_and_never_block(
    start: Callable[..., Twistd], fenced: Fenced
) -> None:
    root = fenced.root
    os.mkfifo(root / "pipe.txt")  # a static file
    os.mkfifo(root / "brain" / "1_1_1" / "0-8_0-8_2-4.tiff")  # a chunk
    (root / "piped").mkdir()
    os.mkfifo(root / "piped" / "info")  # a dataset's info
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "brain" / "socket.txt"))
    hostile = ["/pipe.txt", "/brain/1_1_1/0-8_0-8_2-4", "/piped/info", "/brain/socket.txt"]
    hostile.append("/piped/1_1_1/0-8_0-8_0-2")
    try:
        os.mknod(root / "brain" / "null.txt", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        hostile.append("/brain/null.txt")
    except PermissionError:
        print("no device node: making one needs CAP_MKNOD")
    server = start(root)
    try:
        for path in hostile:
            began = time.monotonic()
            status, body = get(server.url, path)
            assert (status, json.loads(body)["status"]) == (404, 404), path
            assert time.monotonic() - began < 2, path
            assert_healthy(server.url)
        # The listing and the index show none of them, and the real files still answer.
        status, page = get(server.url, "/brain/")
        assert status == 200 and b"notes.txt" in page
        assert b"socket.txt" not in page and b"null.txt" not in page
        status, page = get(server.url, "/")
        assert b"brain" in page and b"piped" not in page
        assert get(server.url, PLAIN_CHUNK) == (200, np.full(128, INSIDE, "<u2").tobytes())
    finally:
        listener.close()


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchanger(a: Path, b: Path) -> Callable[[Path, Path], None]:
    """A function that swaps names ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``),
    or, where the system or filesystem has none, in three renames (missing for a moment)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)

    def atomic(a: Path, b: Path) -> None:
        assert renameat2 is not None
        if renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), RENAME_EXCHANGE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def in_steps(a: Path, b: Path) -> None:
        between = a.with_name(a.name + ".swapping")
        os.rename(a, between)
        os.rename(b, a)
        os.rename(between, b)

    if renameat2 is not None:
        try:
            atomic(a, b)
            atomic(a, b)
            return atomic
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
    return in_steps


def test_a_dataset_swapped_for_a_link_never_serves_outside_bytes(
    start: Callable[..., Twistd], fenced: Fenced
) -> None:
    root, outside = fenced.root, fenced.outside
    server = start(root)
    real, link = root / "brain", root / "brain-link"
    link.symlink_to(outside / "brain")
    swap = exchanger(real, link)
    paths = [PLAIN_CHUNK, PACKED_CHUNK, "/brain/notes.txt", "/brain/info", "/brain/"]
    done = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not done.is_set():
            swap(real, link)  # brain is now the link, then the directory again
            swaps += 1

    statuses: dict[int, int] = {}
    leaks: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        for i in range(count):
            path = paths[i % len(paths)]
            status, body = get(server.url, path)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if any(marker in body for marker in LEAKS):
                    leaks.append((path, body[:80]))

    threads = [threading.Thread(target=client, args=(500,)) for _ in range(4)]
    swapping = threading.Thread(target=swapper)
    swapping.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    swapping.join()
    attempts = sum(statuses.values())
    leaked = sorted({path for path, _ in leaks})
    print(f"swaps: {swaps}; GETs: {attempts}; answers: {statuses}; leaks: {len(leaks)} {leaked}")
    assert leaks == []
    assert set(statuses) <= {200, 404}, statuses
    assert statuses.get(200) and statuses.get(404), "the race did not happen"
    assert swaps > 1000
    assert_healthy(server.url)


def test_with_follow_symlinks_reads_pass_through_links_but_never_reach_a_fifo(
    start: Callable[..., Twistd], fenced: Fenced
) -> None:
    root, outside = fenced.root, fenced.outside
    (root / "linked").symlink_to(outside / "brain")
    os.mkfifo(outside / "brain" / "pipe.txt")
    (root / "brain" / "pipe-link.txt").symlink_to(outside / "brain" / "pipe.txt")
    server = start(root, "--follow-symlinks")
    assert get(server.url, "/linked/1_1_1/0-8_0-8_0-2") == (
        200,
        np.full(128, OUTSIDE, "<u2").tobytes(),
    )
    assert (
        get(server.url, "/linked/1_1_1/8-16_0-8_0-2")[1] == np.full(128, OUTSIDE, "<u2").tobytes()
    )
    assert get(server.url, "/linked/notes.txt") == (200, b"notes of OUTSIDE")
    status, page = get(server.url, "/linked/")
    assert status == 200 and b"outside-only.txt" in page and b"pipe.txt" not in page
    assert b"linked" in get(server.url, "/")[1]
    for path in ("/linked/pipe.txt", "/brain/pipe-link.txt"):
        assert get(server.url, path)[0] == 404, path
        assert_healthy(server.url)
