"""The systemd units in contrib/systemd: checked by ``systemd-analyze verify``, and the
service's own command line run under ``systemd-socket-activate`` (Debian's ``systemd``
package), which hands the server a listening socket the way ``neurotrale.socket`` does."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .test_e2e import TWISTD
from .test_workers import alive, children_of, wait_for, worker_pid

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(
    ACTIVATE is None and not os.environ.get("CI"),
    reason="systemd-socket-activate is not installed (apt-get install systemd)",
)


#: A checkout's code before the installed one, for the server.
PYTHONPATH = os.environ.get("PYTHONPATH")


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_units_verify(tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze is missing (apt-get install systemd)"
    service = (UNITS / "neurotrale.service").read_text()
    # The unit names the install path of the README; verify it against this installation.
    (tmp_path / "neurotrale.service").write_text(
        service.replace("/opt/neurotrale/venv/bin/twistd", TWISTD)
    )
    shutil.copy(UNITS / "neurotrale.socket", tmp_path)
    result = subprocess.run(
        [
            verify,
            "verify",
            str(tmp_path / "neurotrale.socket"),
            str(tmp_path / "neurotrale.service"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    hardening = unit("neurotrale.service")["Service"]
    assert hardening["User"] == "neurotrale"
    assert hardening["ProtectSystem"] == "strict"
    assert hardening["NoNewPrivileges"] == "yes"
    assert hardening["ReadWritePaths"] == "/data"
    assert int(hardening["LimitNOFILE"]) >= 65536


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_runs_the_units_command(
    workers: int, demo_root: Path, tmp_path: Path
) -> None:
    assert ACTIVATE
    service = unit("neurotrale.service")["Service"]
    socket_unit = unit("neurotrale.socket")["Socket"]
    argv = shlex.split(service["ExecStart"])
    # The unit's command, with this installation's twistd, this data root and this pool size.
    argv[0] = TWISTD
    argv[argv.index("--path") + 1] = str(demo_root)
    argv[argv.index("--workers") + 1] = str(workers)
    assert "systemd:domain=INET:index=0" in argv
    assert socket_unit["ListenStream"].startswith("0.0.0.0:")
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [
            ACTIVATE,
            "--listen",
            f"127.0.0.1:{port}",
            f"--fdname={socket_unit['FileDescriptorName']}",
            "-E",
            f"PRECOMPUTED_LOGGING={log}",
            # systemd-socket-activate passes on only what -E names: a checkout's code (and
            # its twistd plugin) is found through PYTHONPATH.
            *(["-E", f"PYTHONPATH={PYTHONPATH}"] if PYTHONPATH else []),
            *argv,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    everyone = {process.pid}
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"Listening on 127.0.0.1:")
        # systemd-socket-activate starts the server on the first connection, which waits
        # in the socket's queue meanwhile: nothing is refused.
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/demo-brain/info", timeout=60) as answer:
            assert answer.status == 200
            assert worker_pid(answer.headers) == process.pid  # systemd-socket-activate exec'd it
        wait_for(
            lambda: len(re.findall(r"worker \d+ serving on", log.read_text())) == workers - 1,
            30,
            "the workers",
        )
        everyone |= children_of(process.pid)
        assert len(everyone) == workers
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while seen != everyone and time.monotonic() < deadline:
            with urllib.request.urlopen(url + "/demo-brain/1_1_1/0-64_0-64_0-32") as answer:
                assert len(answer.read()) == 64 * 64 * 32 * 2
                seen.add(worker_pid(answer.headers))
        assert seen == everyone
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
        wait_for(lambda: not any(alive(pid) for pid in everyone), 15, "every process to exit")
    finally:
        for pid in everyone:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
