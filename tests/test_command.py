"""The command lines as a new user meets them, run as real processes: ``twistd neurotrale``,
``neurotrale`` (``python -m neurotrale_twisted``), ``neurotrale-ingest``, ``neurotrale-demo``.

A mistake is one line naming the option and the value (status 2); a data root or a port that
cannot be served is one line (status 1); ``--version`` prints the project's version;
``--help`` shows every default and the environment; ``--workers`` defaults to the CPUs the
process may use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from neurotrale_twisted import project_version
from neurotrale_twisted.core.annotations.store import AnnotationStore
from neurotrale_twisted.core.cpus import cgroup_cpu_quota, usable_cpus
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.process.options import Options
from neurotrale_twisted.tools.demo import main as demo_main

from .test_e2e import TWISTD
from .test_workers import children_of

PYTHON = sys.executable
COMMANDS = {
    "twistd neurotrale": [TWISTD, "-n", "--pidfile=", "neurotrale"],
    "neurotrale": [PYTHON, "-m", "neurotrale_twisted"],
}
TASKSET = shutil.which("taskset")
#: One option in twistd's help: its name, then its text up to the next option.
OPTION_ENTRY = r"^\s+(?:-\w, )?--([a-z-]+)=?\s+(.*?)(?=\n\s+(?:-\w, )?--|\n$)"


def run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("program", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--workers", "0"], "--workers '0': must be a whole number of at least 1"),
        (["--threads", "many"], "--threads 'many': must be a whole number of at least 1"),
        (["--keep-versions", "-2"], "--keep-versions '-2': must be a whole number of at least 0"),
        (["--bogus"], "--bogus"),
        (["--port"], "--port requires argument"),
        (["--auth-reads"], "--auth-reads needs --htpasswd"),
        (["brain1"], "unexpected argument 'brain1'"),
        (["--path="], "--path '': must name a directory"),
    ],
)
def test_a_mistake_is_one_line_naming_the_option_and_status_2(
    program: str, args: list[str], named: str, tmp_path: Path
) -> None:
    done = run(*COMMANDS[program], "--path", str(tmp_path), *args)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{program}: error: "), lines
    assert named in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("program", sorted(COMMANDS))
def test_a_missing_data_root_is_one_line_and_status_1(program: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = run(*COMMANDS[program], "--path", str(missing))
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        f"{program}: error: the data root {str(missing)!r} is not a directory (--path)"
    ]
    assert done.stdout == ""
    unreadable = run(*COMMANDS[program], "--path", str(tmp_path), "--htpasswd", str(missing))
    assert unreadable.returncode == 1, unreadable
    assert unreadable.stderr.splitlines() == [
        f"{program}: error: cannot read the htpasswd file {str(missing)!r} (--htpasswd)"
    ]


@pytest.mark.parametrize("program", sorted(COMMANDS))
def test_a_busy_port_is_one_line_and_status_1(program: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(
            *COMMANDS[program],
            "--path",
            str(tmp_path),
            "--workers",
            "2",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        )
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        f"{program}: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "Traceback" not in done.stdout


@pytest.mark.parametrize("program", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("args", "status", "named"),
    [
        (["--port", "70000"], 2, "--port '70000': must be a whole number from 1 to 65535"),
        (["--listen", "tcp:99999"], 2, "--listen 'tcp:99999': the port must be 0 to 65535"),
        (["--listen", "tcp:abc"], 2, "--listen 'tcp:abc': "),
        (["--listen", "bogus:1"], 2, "--listen 'bogus:1': Unknown endpoint type: 'bogus'"),
        (["--listen", "unix:{tmp}/no/such.sock"], 1, "the directory '{tmp}/no' does not exist"),
        (["--listen", "ssl:0:privateKey={tmp}/key.pem"], 1, "No such file or directory"),
        (["--listen", "systemd:domain=INET:index=0"], 1, "systemd passed no such socket"),
    ],
)
def test_a_listen_that_cannot_work_is_one_line_before_anything_starts(
    program: str, args: list[str], status: int, named: str, tmp_path: Path
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = run(*COMMANDS[program], "--path", str(tmp_path), *args)
    assert done.returncode == status, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{program}: error: "), lines
    assert named.replace("{tmp}", str(tmp_path)) in lines[0]
    assert done.stdout == ""


def test_a_busy_port_stops_a_daemon_at_once(tmp_path: Path) -> None:
    """``twistd neurotrale`` (a daemon): the process that waits for the daemon to start says
    why it did not and exits 1, instead of waiting forever; no pid file is left behind."""
    pidfile = tmp_path / "twistd.pid"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(
            TWISTD,
            f"--pidfile={pidfile}",
            f"--logfile={tmp_path / 'twistd.log'}",
            "neurotrale",
            "--path",
            str(tmp_path),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            timeout=30,
        )
    assert done.returncode == 1, done
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not pidfile.exists()


def test_every_command_prints_the_project_version() -> None:
    version = project_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)
    for command, name in [
        ([*COMMANDS["twistd neurotrale"], "--version"], "neurotrale-twisted"),
        ([*COMMANDS["neurotrale"], "--version"], "neurotrale-twisted"),
        ([PYTHON, "-m", "neurotrale_twisted.tools.ingest", "--version"], "neurotrale-ingest"),
        ([PYTHON, "-m", "neurotrale_twisted.tools.demo", "--version"], "neurotrale-demo"),
    ]:
        done = run(*command)
        assert (done.returncode, done.stdout) == (0, f"{name} {version}\n"), command


@pytest.mark.skipif(TASKSET is None, reason="no taskset (util-linux)")
def test_help_shows_every_default_and_the_environment() -> None:
    assert TASKSET is not None
    done = run(TASKSET, "-c", "0", *COMMANDS["neurotrale"], "--help")
    assert done.returncode == 0
    text = done.stdout
    assert text.startswith("Usage: neurotrale [options]\n")
    # One entry per option: from its name to the next option's (the list ends at a blank line).
    listed = text.split("\n\n")[0] + "\n"
    entries = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^\s+(?:-\w, )?--([a-z-]+)=?\s+(.*?)(?=\n\s+(?:-\w, )?--|\n$)", listed, re.S | re.M
        )
    }
    for name, *_ in Options.optParameters:
        assert "[default:" in entries[name], (name, entries[name])
    for name, *_ in Options.optFlags:
        assert "[off]" in entries[name], name
    for name in ("listen", "cors-origin"):
        assert "[default:" in entries[name], name
    workers = " ".join(entries["workers"].split())
    assert "[default: the CPUs this process may use, 1 here]" in workers
    assert "at most 32: 5 here]" in " ".join(entries["threads"].split())
    assert "\nEnvironment:\n" in text
    assert re.search(r"^  PRECOMPUTED_PATH +the data root", text, re.M)
    assert re.search(r"^  PRECOMPUTED_LOGGING +a file", text, re.M)


@pytest.fixture
def neurotrale(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.skipif(TASKSET is None, reason="no taskset (util-linux)")
def test_neurotrale_serves_with_one_process_per_usable_cpu(
    demo_root: Path, tmp_path: Path, neurotrale: list[subprocess.Popen[bytes]]
) -> None:
    """``python -m neurotrale_twisted`` is ``twistd -n neurotrale``; on one usable CPU its
    default is one process (no worker children)."""
    assert TASKSET is not None
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [
            TASKSET,
            "-c",
            "0",
            *COMMANDS["neurotrale"],
            "--path",
            str(demo_root),
            "--listen",
            "tcp:0:interface=127.0.0.1",
        ],
        env={**os.environ, "PRECOMPUTED_LOGGING": str(log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    neurotrale.append(process)
    deadline = time.monotonic() + 30
    url = None
    while url is None and time.monotonic() < deadline and process.poll() is None:
        match = re.search(
            r"NeurotraleSite starting on (\d+)", log.read_text() if log.exists() else ""
        )
        if match:
            url = f"http://127.0.0.1:{match.group(1)}"
        time.sleep(0.1)
    assert url is not None, log.read_text() if log.exists() else "no log"
    with urllib.request.urlopen(url + "/healthz", timeout=10) as answer:
        assert answer.status == 200
        assert json.loads(answer.read())["status"] == "ok"
    time.sleep(0.5)  # workers, had there been any, would have started by now
    assert children_of(process.pid) == set()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) in (0, -signal.SIGTERM)  # twistd re-raises the signal


@pytest.mark.parametrize(
    ("command", "named"),
    [
        (["neurotrale_twisted.tools.ingest", "--source", "x", "--dest", "y", "--bogus"], "--bogus"),
        (["neurotrale_twisted.tools.ingest", "--source", "x", "--dest", "y", "--jobs", "x"], "'x'"),
        (["neurotrale_twisted.tools.ingest", "--dest", "y"], "--source"),
        (["neurotrale_twisted.tools.demo"], "directory"),
        (["neurotrale_twisted.tools.demo", "DIR", "--compression", "foo"], "'foo'"),
        (
            ["neurotrale_twisted.tools.demo", "DIR", "--name", "../elsewhere"],
            "--name '../elsewhere'",
        ),
        (["neurotrale_twisted.tools.demo", "DIR", "--name", "a/b"], "--name 'a/b'"),
    ],
)
def test_ingest_and_demo_mistakes_are_one_line_and_status_2(
    command: list[str], named: str, tmp_path: Path
) -> None:
    args = [a.replace("DIR", str(tmp_path / "demo")) for a in command]
    done = run(PYTHON, "-m", *args)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    program = "neurotrale-" + command[0].rsplit(".", 1)[1]
    assert lines[0].startswith(f"{program}: error: "), lines
    assert named in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, here or beside


def test_demo_into_a_directory_it_cannot_make_is_one_line_and_status_1(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    where = tmp_path / "a-file" / "demo"
    done = run(PYTHON, "-m", "neurotrale_twisted.tools.demo", str(where))
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("neurotrale-demo: error: cannot write "), lines
    assert "Not a directory" in lines[0]


# --- how many CPUs ---------------------------------------------------------------------------


def cgroup_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    return root


def test_cgroup_v2_quota_caps_the_cpus(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup-of-self"
    proc.write_text("0::/lab/server\n")
    limited = cgroup_tree(tmp_path, {"lab/server/cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(limited, proc) == 2  # 1.5 CPUs round up
    assert usable_cpus(str(limited), str(proc)) == min(2, len(os.sched_getaffinity(0)))
    (limited / "lab/server/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(limited, proc) is None
    (limited / "lab/cpu.max").write_text("50000 100000\n")  # a parent's limit counts too
    assert cgroup_cpu_quota(limited, proc) == 1
    assert usable_cpus(str(limited), str(proc)) == 1


def test_cgroup_v1_quota_caps_the_cpus(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup-of-self"
    proc.write_text("5:memory:/x\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    tree = cgroup_tree(
        tmp_path,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(tree, proc) == 3
    (tree / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tree, proc) is None
    assert usable_cpus(str(tree), str(proc)) == len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path / "none"), str(tmp_path / "none")) >= 1


# --- neurotrale-demo over an existing demo -----------------------------------------------------


def test_demo_refuses_to_rewrite_without_force_and_keeps_versions_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo_main([str(tmp_path)])
    block = tmp_path / "demo-brain/annotations/x0y0z0"
    original = (block / "z-0020.json").read_bytes()
    mine = [{"point": [5, 6, 20], "type": "point", "id": "my-work", "anntype": "neuron"}]
    store = AnnotationStore(DataRoot(tmp_path))
    store.put(block / "z-0020.json", json.dumps(mine).encode())
    capsys.readouterr()

    with pytest.raises(SystemExit) as refused:
        demo_main([str(tmp_path)])
    assert refused.value.code == 2
    said = capsys.readouterr()
    assert said.out == ""
    assert said.err.count("\n") == 1 and "already exists" in said.err and "--force" in said.err
    assert json.loads((block / "z-0020.json").read_bytes()) == mine

    demo_main([str(tmp_path), "--force"])
    assert (block / "z-0020.json").read_bytes() == original
    kept = sorted((block / ".versions/z-0020.json").iterdir())
    assert [json.loads(p.read_bytes()) for p in kept][-1] == mine
    # Files nobody changed made no version.
    assert not (block / ".versions/fibers.json").exists()


def test_demo_suggests_serving_it_to_this_machine_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the README's quickstart: anyone who reaches the server may write annotations."""
    demo_main([str(tmp_path)])
    said = capsys.readouterr().out
    assert said.endswith(
        f"serve it with: neurotrale --path {tmp_path} --listen tcp:9000:interface=127.0.0.1\n"
    )
