"""The container: its entry point script (run with a stub ``twistd`` that records the argv it
is given, and with the real one), its health check, and the Dockerfile's contract."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

from .test_systemd import free_port
from .test_workers import children_of, wait_for, worker_pid

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "contrib" / "docker" / "entrypoint.sh"
BIN = str(Path(sys.executable).parent)


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """A directory with a ``twistd`` that writes its arguments, NUL-separated, to a file."""
    directory = tmp_path / "bin"
    directory.mkdir()
    script = directory / "twistd"
    script.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n')
    script.chmod(0o755)
    return directory


def run_entrypoint(
    stub: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, list[str] | None, str]:
    """Run the entry point with the stub first on PATH: exit status, argv given to twistd
    (None if it was not run) and stderr."""
    argv_file = stub / "argv"
    argv_file.unlink(missing_ok=True)
    result = subprocess.run(
        [str(ENTRYPOINT), *args],
        env={"PATH": f"{stub}:/usr/bin:/bin", "ARGV_FILE": str(argv_file), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )
    argv = argv_file.read_text().split("\0")[:-1] if argv_file.exists() else None
    return result.returncode, argv, result.stderr


BASE = ["--nodaemon", "--pidfile=", "neurotrale", "--path", "/data"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], [*BASE, "--workers", "10", "--listen", "tcp:9000"]),
        (["--workers", "15"], [*BASE, "--workers", "15", "--listen", "tcp:9000"]),
        (["--port", "9100", "-w", "2"], [*BASE, "--workers", "2", "--listen", "tcp:9100"]),
        (["--workers=3", "--port=9001"], [*BASE, "--workers", "3", "--listen", "tcp:9001"]),
        (
            ["--follow-symlinks", "--cors-origin", "https://viewer.lab.org", "--workers", "4"],
            [
                *BASE,
                "--workers",
                "4",
                "--listen",
                "tcp:9000",
                "--follow-symlinks",
                "--cors-origin",
                "https://viewer.lab.org",
            ],
        ),
        # apptainer run image.sif /apps/entrypoint.sh ARGS
        (
            ["/apps/entrypoint.sh", "--workers", "6"],
            [*BASE, "--workers", "6", "--listen", "tcp:9000"],
        ),
        (
            ["--listen", "unix:/run/a b.sock"],
            [*BASE, "--workers", "10", "--listen", "unix:/run/a b.sock"],
        ),
        (
            ["--listen=unix:/run/x.sock", "--port", "9002"],
            [*BASE, "--workers", "10", "--listen", "tcp:9002", "--listen=unix:/run/x.sock"],
        ),
    ],
)
def test_entrypoint_execs_twistd_with(stub: Path, args: list[str], expected: list[str]) -> None:
    status, argv, stderr = run_entrypoint(stub, *args)
    assert (status, stderr) == (0, "")
    assert argv == expected


def test_entrypoint_takes_the_data_root_and_defaults_from_the_environment(stub: Path) -> None:
    status, argv, _ = run_entrypoint(
        stub, env={"PRECOMPUTED_PATH": "/srv/brains", "NEUROTRALE_WORKERS": "3"}
    )
    assert status == 0
    assert argv == [*BASE[:-1], "/srv/brains", "--workers", "3", "--listen", "tcp:9000"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers needs a positive integer, not '0'"),
        (["--workers", "many"], "--workers needs a positive integer, not 'many'"),
        (["--port=-1"], "--port needs a positive integer, not '-1'"),
        (["--port"], "--port needs a value"),
    ],
)
def test_entrypoint_refuses_bad_values_at_once(stub: Path, args: list[str], message: str) -> None:
    status, argv, stderr = run_entrypoint(stub, *args)
    assert status == 2
    assert argv is None  # twistd never ran
    assert message in stderr


def test_an_unknown_argument_fails_fast_with_a_message(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(ENTRYPOINT), "--workers", "2", "--frobnicate"],
        env={"PATH": f"{BIN}:/usr/bin:/bin", "PRECOMPUTED_PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "frobnicate" in result.stdout + result.stderr
    assert time.monotonic() - started < 30


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "healthcheck", REPO / "contrib" / "docker" / "healthcheck.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_server_through_the_entrypoint_and_its_healthcheck(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [str(ENTRYPOINT), "--workers", "2", "--port", str(port)],
        env={
            "PATH": f"{BIN}:/usr/bin:/bin",
            "PRECOMPUTED_PATH": str(demo_root),
            "PRECOMPUTED_LOGGING": str(log),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: log.exists() and "worker 1 serving on" in log.read_text(), 60, "the server"
        )
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/healthz") as answer:
            assert answer.status == 200
            assert worker_pid(answer.headers) in {process.pid, *children_of(process.pid)}
        healthcheck = load_healthcheck()
        monkeypatch.setattr(healthcheck, "port", lambda: port)
        assert healthcheck.main() == 0
        monkeypatch.setattr(healthcheck, "port", lambda: free_port())
        assert healthcheck.main() == 1
        process.send_signal(signal.SIGTERM)  # docker stop
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_healthcheck_finds_the_port_on_the_servers_command_line(tmp_path: Path) -> None:
    healthcheck = load_healthcheck()
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"twistd\0--nodaemon\0neurotrale\0--listen\0tcp:9100\0")
    assert healthcheck.port(str(cmdline)) == 9100
    cmdline.write_bytes(b"twistd\0neurotrale\0--listen=unix:/x\0--listen=tcp:9200:interface=::\0")
    assert healthcheck.port(str(cmdline)) == 9200
    assert healthcheck.port(str(tmp_path / "missing")) == 9000


def test_dockerfile_keeps_the_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert re.search(r"^EXPOSE 9000$", text, re.M)
    assert re.search(r"^VOLUME /data$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/apps/entrypoint.sh"\]$', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.M)
    user = re.findall(r"^USER (.+)$", text, re.M)
    assert user and user[-1] not in ("root", "0", "0:0")
    assert "getPlugins(IPlugin)" in text  # the plugin cache is written at build time
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M):
        assert (REPO / source).exists(), source


# hadolint (Dockerfile) and shellcheck (entrypoint.sh) run from .ci/run, with ruff and mypy.
