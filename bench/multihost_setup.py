"""Two "hosts" over one shared directory whose POSIX locks are local, behind haproxy.

Shared by ``tests/test_multihost.py`` and ``bench/patch_bench.py`` (a benchmark never
imports ``tests/``; the test imports this module as ``bench.multihost_setup``).

One directory is seen through two ``bindfs`` FUSE mounts. A ``fcntl`` lock taken through
one mount does not block the other (each mount is its own FUSE file system, and the kernel
keeps the locks of a FUSE file system that does not implement them itself): exactly the
situation of BeeGFS without ``tuneUseGlobalFileLocks``, Lustre with ``localflock`` or NFS
with ``local_lock=all``. A ``twistd neurotrale --workers N`` runs on each mount on a fixed
port (so that a restarted host comes back where haproxy expects it), and haproxy, with
``contrib/multihost/haproxy.cfg``, sends requests to both in turn.

Needs root (or a user allowed to use ``/dev/fuse``), ``bindfs``, ``fusermount`` and
``haproxy``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = REPO / "contrib" / "multihost" / "haproxy.cfg"
TWISTD = str(Path(sys.executable).parent / "twistd")
#: The dataset the hosts serve, and the annotation block the tools write to.
DATASET = "brain"
BLOCK = "x0y0z0"
#: The URL path of the block's directory through haproxy (which strips ``/data``).
BLOCK_URL = f"/data/{DATASET}/annotations/{BLOCK}"
#: fuse3's unmount tool (``fusermount`` is its older name, a link to it on Debian).
FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it is true (returning its value) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def missing_tools() -> str | None:
    """Why two bindfs mounts behind haproxy cannot be set up here, or None when they can."""
    if shutil.which("bindfs") is None or shutil.which(FUSERMOUNT) is None:
        return "bindfs or fusermount is not installed (apt-get install bindfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (a container needs --device /dev/fuse)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by this user"
    if shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        return "haproxy is not installed (apt-get install haproxy)"
    return None


def write_dataset(root: Path) -> None:
    """A minimal dataset under ``root`` (an ``info`` and an empty annotation block)."""
    dataset = root / DATASET
    (dataset / "annotations" / BLOCK).mkdir(parents=True)
    scale = {
        "chunk_sizes": [[64, 64, 64]],
        "encoding": "raw",
        "key": "1_1_1",
        "resolution": [1000, 1000, 1000],
        "size": [256, 256, 256],
        "voxel_offset": [0, 0, 0],
    }
    info = {"data_type": "uint16", "num_channels": 1, "scales": [scale], "type": "image"}
    (dataset / "info").write_text(json.dumps(info))


#: FUSE keeps a file's attributes (its size) for a second by default, and a reader through
#: one mount of a file just renamed over through the other then reads the new content cut at
#: the old size: a torn read no network file system gives (NFS revalidates on open). With
#: these the mounts behave like NFS's close-to-open consistency; locks stay local.
NO_ATTRIBUTE_CACHE = "attr_timeout=0,entry_timeout=0,negative_timeout=0"


class SharedDirectory:
    """``source`` seen through ``count`` bindfs mounts under ``base``: the hosts' views."""

    def __init__(self, base: Path, count: int = 2) -> None:
        self.source = base / "shared"
        self.source.mkdir(parents=True)
        self.mounts = [base / f"host-{chr(ord('a') + i)}" for i in range(count)]
        self._mounted: list[Path] = []
        try:
            for mount in self.mounts:
                mount.mkdir()
                subprocess.run(
                    [
                        "bindfs",
                        "--no-allow-other",
                        "-o",
                        NO_ATTRIBUTE_CACHE,
                        str(self.source),
                        str(mount),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                self._mounted.append(mount)
        except BaseException:
            self.unmount()
            raise

    def unmount(self) -> None:
        """Unmount every mount (lazily if it is busy); safe to call twice."""
        while self._mounted:
            mount = self._mounted.pop()
            done = subprocess.run([FUSERMOUNT, "-u", str(mount)], capture_output=True)
            if done.returncode != 0:
                subprocess.run([FUSERMOUNT, "-u", "-z", str(mount)], capture_output=True)


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def lock_blocks(holder_path: Path, other_path: Path) -> bool:
    """Whether a ``fcntl.lockf`` lock held on ``holder_path`` by another process blocks a
    lock on ``other_path`` (the same file, maybe through another mount) in this one."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(holder_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"locked":
            raise RuntimeError("the lock holder did not start")
        fd = os.open(other_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def children_of(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (zombies count as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def healthy(url: str) -> bool:
    """Whether the server at ``url`` answers ``/healthz`` with 200."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Host:
    """``twistd neurotrale --workers N`` on one mount, on a port that survives restarts.

    ``env`` is added to the server's environment (``PYTHONPATH`` picks the code it runs).
    """

    def __init__(
        self,
        name: str,
        root: Path,
        logs: Path,
        *args: str,
        workers: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self.logs = logs
        self.args = args
        self.workers = workers
        self.env = {**os.environ, **(env or {})}
        self.env.pop("PRECOMPUTED_LOGGING", None)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.launches = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.start(new_port=True)

    @property
    def address(self) -> str:
        """``host:port``, as haproxy's configuration names it."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60, *, new_port: bool = False) -> None:
        """Start the server and wait until every process serves.

        A port taken meanwhile by someone else (it was free when chosen) is tried again:
        with a new port when ``new_port`` (the first start, before haproxy knows it), else
        the same port after a moment.
        """
        for attempt in range(4):
            if self._launch(timeout):
                return
            if new_port:
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
            time.sleep(0.5 * attempt)
        raise RuntimeError(f"{self.name} cannot listen on {self.address}")

    def _launch(self, timeout: float) -> bool:
        """Start the server once; False when its port was in use."""
        self._close_log()
        self.launches += 1
        log_path = self.logs / f"{self.name}-{self.launches}.log"
        self._log = log_path.open("wb")
        command = [
            TWISTD,
            "-n",
            "--pidfile=",
            "neurotrale",
            "--path",
            str(self.root),
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--workers",
            str(self.workers),
            *self.args,
        ]
        # Not the caller's directory: the workers run ``python -m``, which puts the working
        # directory first on sys.path, and a source tree there would shadow the code chosen.
        self.process = process = subprocess.Popen(
            command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.logs
        )

        def ready() -> bool:
            if process.poll() is not None:
                return True
            text = log_path.read_text(errors="replace")
            return (
                "NeurotraleSite starting on" in text
                and len(re.findall(r"worker \d+ serving on", text)) >= self.workers - 1
                and healthy(self.url)
            )

        wait_until(ready, timeout, f"{self.name} to serve")
        if process.poll() is None:
            return True
        text = log_path.read_text(errors="replace")
        if "Address already in use" in text:
            return False
        raise RuntimeError(f"{self.name} exited:\n{text[-3000:]}")

    def pids(self) -> tuple[int, set[int]]:
        """The parent's pid and its live workers' pids."""
        assert self.process is not None
        return self.process.pid, children_of(self.process.pid)

    def kill_worker(self, choose: Callable[[list[int]], int]) -> bool:
        """SIGKILL one worker (``choose`` picks it); False when none is running."""
        _, workers = self.pids()
        if not workers:
            return False
        os.kill(choose(sorted(workers)), signal.SIGKILL)
        return True

    def kill_parent_and_restart(self) -> None:
        """SIGKILL the parent, wait for its workers to notice and exit, start it again."""
        assert self.process is not None
        parent, workers = self.pids()
        os.kill(parent, signal.SIGKILL)
        self.process.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in workers), 20, "orphan workers to exit")
        self._close_log()
        self.start()

    def metrics(self) -> str:
        """This host's ``/metrics`` text (summed over its processes), or "" if it is down."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
                return str(answer.read().decode())
        except (urllib.error.URLError, OSError):
            return ""

    def stop(self) -> None:
        """SIGTERM the parent (SIGKILL everything after 20 s); safe to call twice."""
        if self.process is None:
            return
        _, workers = self.pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class Balancer:
    """haproxy with ``contrib/multihost/haproxy.cfg`` in front of ``hosts``, round-robin."""

    def __init__(self, hosts: list[Host], log: Path) -> None:
        if len(hosts) not in (1, 2):
            raise ValueError("the configuration names one or two hosts")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "NEUROTRALE_PROXY_BIND": f"127.0.0.1:{self.port}",
            "NEUROTRALE_HOST_A": hosts[0].address,
            # One host: both entries name it, so the configuration stays the same file.
            "NEUROTRALE_HOST_B": hosts[-1].address,
        }
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [haproxy, "-db", "-f", str(HAPROXY_CONFIG)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: healthy(self.url + "/data"), 20, "haproxy to forward")

    def stop(self) -> None:
        """Stop haproxy; safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self._log.close()
