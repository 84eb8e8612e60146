"""The container: its entry point script (run with a stub ``twistd`` that records the argv it
is given, and with the real one), its health check, and the Dockerfile's contract."""

from __future__ import annotations

import importlib.util
import os
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
from .test_workers import children_of, self_signed, wait_for, worker_pid

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "contrib" / "docker" / "entrypoint.sh"
BIN = str(Path(sys.executable).parent)
#: PYTHONPATH, kept for the real server: a checkout's code before the installed one.
PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


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
        ([], [*BASE, "--listen", "tcp:9000"]),
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
            [*BASE, "--listen", "unix:/run/a b.sock"],
        ),
        (
            ["--listen=unix:/run/x.sock", "--port", "9002"],
            [*BASE, "--listen", "tcp:9002", "--listen=unix:/run/x.sock"],
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
        env={"PATH": f"{BIN}:/usr/bin:/bin", "PRECOMPUTED_PATH": str(tmp_path), **PYTHONPATH},
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


def start_through_entrypoint(root: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """The real server started by the entry point with ``args``, once every worker serves."""
    process = subprocess.Popen(
        [str(ENTRYPOINT), "--workers", "2", *args],
        env={
            "PATH": f"{BIN}:/usr/bin:/bin",
            "PRECOMPUTED_PATH": str(root),
            "PRECOMPUTED_LOGGING": str(log),
            **PYTHONPATH,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(
        lambda: (
            process.poll() is not None
            or (log.exists() and "worker 1 serving on" in log.read_text())
        ),
        60,
        "the server",
    )
    assert process.poll() is None, log.read_text()
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server as ``docker stop`` does (SIGTERM), and see it exit cleanly."""
    try:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_real_server_through_the_entrypoint_and_its_healthcheck(
    demo_root: Path, tmp_path: Path
) -> None:
    port = free_port()
    process = start_through_entrypoint(demo_root, tmp_path / "server.log", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/healthz") as answer:
            assert answer.status == 200
            assert worker_pid(answer.headers) in {process.pid, *children_of(process.pid)}
        healthcheck = load_healthcheck()
        # The entry point execs the server: its command line is the one the check reads.
        assert healthcheck.main(f"/proc/{process.pid}/cmdline") == 0
        elsewhere = tmp_path / "cmdline"
        elsewhere.write_bytes(f"twistd\0neurotrale\0--port\0{free_port()}\0".encode())
        assert healthcheck.main(str(elsewhere)) == 1
    finally:
        stop(process)
    assert healthcheck.main(f"/proc/{process.pid}/cmdline") == 1  # gone


def test_the_healthcheck_reaches_a_server_on_a_unix_socket_only(
    demo_root: Path, tmp_path: Path
) -> None:
    socket_path = tmp_path / "server.sock"
    process = start_through_entrypoint(
        demo_root, tmp_path / "server.log", "--listen", f"unix:{socket_path}"
    )
    healthcheck = load_healthcheck()
    cmdline = f"/proc/{process.pid}/cmdline"
    try:
        assert healthcheck.probe(healthcheck.read_arguments(cmdline) or []) == (
            "unix",
            str(socket_path),
            0,
        )
        assert healthcheck.main(cmdline) == 0
    finally:
        stop(process)
    elsewhere = tmp_path / "cmdline"
    elsewhere.write_bytes(f"twistd\0neurotrale\0--listen=unix:{socket_path}\0".encode())
    assert healthcheck.main(str(elsewhere)) == 1  # nobody listens there any more


def test_the_healthcheck_reaches_a_server_on_tls_only(demo_root: Path, tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    port = free_port()
    process = start_through_entrypoint(
        demo_root,
        tmp_path / "server.log",
        f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    healthcheck = load_healthcheck()
    cmdline = f"/proc/{process.pid}/cmdline"
    try:
        assert healthcheck.probe(healthcheck.read_arguments(cmdline) or []) == (
            "https",
            "127.0.0.1",
            port,
        )
        assert healthcheck.main(cmdline) == 0
        # Plain HTTP to the TLS port is not an answer.
        plain = tmp_path / "plain"
        plain.write_bytes(f"twistd\0neurotrale\0--listen\0tcp:{port}\0".encode())
        assert healthcheck.main(str(plain)) == 1
    finally:
        stop(process)


@pytest.mark.parametrize(
    ("cmdline", "probe"),
    [
        (b"twistd\0--nodaemon\0neurotrale\0--listen\0tcp:9100\0", ("http", "127.0.0.1", 9100)),
        (
            b"twistd\0neurotrale\0--listen=tcp:9200:interface=\\:\\:\0--listen=unix:/x\0",
            ("http", "::1", 9200),
        ),
        (b"twistd\0neurotrale\0--listen=tcp6:9200\0", ("http", "::1", 9200)),
        (
            b"twistd\0neurotrale\0--listen=tcp:9200:interface=127.0.0.7\0",
            ("http", "127.0.0.7", 9200),
        ),
        (b"twistd\0neurotrale\0--listen=unix:/x\0--listen=tcp:9200\0", ("unix", "/x", 0)),
        (
            b"twistd\0neurotrale\0--listen\0unix:address=/run/a\\:b.sock:mode=660\0",
            ("unix", "/run/a:b.sock", 0),
        ),
        (
            b"twistd\0neurotrale\0--listen\0systemd:domain=INET:index=0\0"
            b"--listen\0ssl:9443:privateKey=k.pem:certKey=c.pem:interface=10.0.0.5\0",
            ("https", "10.0.0.5", 9443),
        ),
        (b"twistd\0neurotrale\0--port=9300\0", ("http", "127.0.0.1", 9300)),
        (b"twistd\0neurotrale\0--workers\04\0", ("http", "127.0.0.1", 9000)),
        (
            b"twistd\0neurotrale\0--listen\0systemd:domain=INET:index=0\0",
            ("http", "127.0.0.1", 9000),
        ),
    ],
)
def test_healthcheck_finds_the_endpoint_on_the_servers_command_line(
    tmp_path: Path, cmdline: bytes, probe: tuple[str, str, int]
) -> None:
    healthcheck = load_healthcheck()
    path = tmp_path / "cmdline"
    path.write_bytes(cmdline)
    assert healthcheck.probe(healthcheck.read_arguments(str(path)) or []) == probe


def test_healthcheck_without_a_command_line_asks_port_9000(tmp_path: Path) -> None:
    healthcheck = load_healthcheck()
    assert healthcheck.read_arguments(str(tmp_path / "missing")) is None
    assert healthcheck.server_arguments(str(tmp_path)) == []
    assert healthcheck.probe([]) == ("http", "127.0.0.1", 9000)


def test_healthcheck_finds_the_server_under_an_init_process(tmp_path: Path) -> None:
    # docker run --init: process 1 is the init, the entry point's server one of its children.
    commands = {
        1: b"/sbin/docker-init\0--\0/apps/entrypoint.sh\0--port\09100\0",
        7: b"/usr/local/bin/python\0/usr/local/bin/twistd\0--nodaemon\0--pidfile=\0"
        b"neurotrale\0--path\0/data\0--workers\0"
        b"2\0--listen\0tcp:9100\0",
        9: b"/usr/local/bin/python\0-c\0from neurotrale_twisted.process import workers\0",
    }
    for pid, command in commands.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(command)
    (tmp_path / "self").mkdir()
    healthcheck = load_healthcheck()
    assert healthcheck.probe(healthcheck.server_arguments(str(tmp_path))) == (
        "http",
        "127.0.0.1",
        9100,
    )
    # Without --init, process 1 is the server itself.
    (tmp_path / "1" / "cmdline").write_bytes(b"twistd\0neurotrale\0--listen\0unix:/s\0")
    assert healthcheck.probe(healthcheck.server_arguments(str(tmp_path))) == ("unix", "/s", 0)


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
    # Another --build-arg UID must not install everything again: the user comes last.
    assert text.index("ARG UID") > text.rindex("pip install")
    assert (REPO / ".dockerignore").exists()
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M):
        assert (REPO / source).exists(), source


# hadolint (Dockerfile) and shellcheck (entrypoint.sh) run from .ci/run, with ruff and mypy.
