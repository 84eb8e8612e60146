"""The container image, built from the ``Dockerfile`` and run with podman, probed from the host
as a user would: a bind-mounted data root, published ports, ``podman healthcheck run``,
``podman stop``.

No registry is needed: the base the ``FROM`` line names is made here from Debian's packages
with ``mmdebstrap`` (Debian's python3 in a virtual environment at /usr/local, the layout of the
official ``python:3.11-slim`` image), imported under that name and built on with
``--pull=never``. The base's tarball and podman's layers are kept under ``CACHE`` (outside the
checkout), so a second run rebuilds only what changed. These tests use a podman store of their
own there: they never see or touch anything else's images or containers, and remove every
container they start, even when a test fails.

Skipped when podman, runc or mmdebstrap is missing, or without root, except under ``CI=true``
(where ``.ci/run`` installs them), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from neurotrale_twisted.tools.demo import DEMO_SIZE, microscopy_volume, write_demo

from .support import raw_of
from .test_systemd import free_port
from .test_workers import get, self_signed, wait_for

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NEUROTRALE_CONTAINER_CACHE", "/var/tmp/neurotrale-container-test"))
#: podman's store and run directory for these tests alone.
STORE = CACHE / "storage"
RUNROOT = Path("/run/neurotrale-container-test")
#: The stand-in for the official image: Debian's Python 3.11 (bookworm's) with pip, in a
#: virtual environment at /usr/local, so ``python`` and ``pip`` are found first on PATH and
#: ``pip install`` installs system-wide, as in ``python:3.11-slim-bookworm``.
MMDEBSTRAP = [
    "mmdebstrap",
    "--quiet",
    "--variant=minbase",
    "--include=python3,python3-venv,ca-certificates",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    '--customize-hook=chroot "$1" python3 -m venv /usr/local',
    "bookworm",
]
BASE_CHANGES = [
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]
#: The image's default user, and another one given with --build-arg UID.
DEFAULT_UID = 1000
OTHER_UID = 4321
#: The host's certificate authorities, mounted (read-only) into the build's steps so that pip
#: reaches PyPI from a machine whose HTTPS goes through an inspecting proxy; nothing of it stays
#: in the image. Debian's pip trusts this file.
HOST_CAS = Path("/etc/ssl/certs/ca-certificates.crt")
#: A label on every container started here, naming this test session.
LABEL = "org.neurotrale.test"
SESSION = uuid.uuid4().hex[:12]
CHUNK = "/demo-brain/1_1_1/0-64_0-64_0-32"


def missing_tools() -> str | None:
    """Why these tests cannot run here, or None."""
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc mmdebstrap)"
    if os.geteuid() != 0:
        return "podman and mmdebstrap run here as root (rootful podman, mmdebstrap's root mode)"
    return None


def limits() -> list[str]:
    """The ``--ulimit`` options for every container. podman asks for 1048576 open files and
    processes, which only a caller with CAP_SYS_RESOURCE gets; without it the runtime fails
    ("setrlimit: operation not permitted"). So: this process's own open-file limit, and a
    process limit every machine allows (it counts the container user's processes)."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    processes = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 4096)
    if files == resource.RLIM_INFINITY:
        files = 1048576
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", f"nproc={processes}:{processes}"]


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run podman on this module's store: runc (crun 1.8 refuses hybrid cgroup hierarchies),
    cgroupfs (no systemd needed)."""
    command = [
        "podman",
        "--root",
        str(STORE),
        "--runroot",
        str(RUNROOT),
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stderr}")
    return result


def base_name() -> str:
    """The image the Dockerfile's ``FROM`` names."""
    match = re.search(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert match
    return match.group(1)


def base_tarball() -> Path:
    """The base's root filesystem, made once by mmdebstrap and kept under CACHE."""
    key = hashlib.sha256("\0".join(MMDEBSTRAP).encode()).hexdigest()[:16]
    tarball = CACHE / f"base-{key}.tar"
    if not tarball.exists():
        for stale in CACHE.glob("base-*.tar*"):
            stale.unlink()
        partial = tarball.with_suffix(f".tar.{os.getpid()}.partial.tar")
        subprocess.run([*MMDEBSTRAP, str(partial)], check=True, timeout=900)
        partial.rename(tarball)
    return tarball


def import_base() -> None:
    """The base image under the name ``FROM`` uses, unless it is there already, the same."""
    tarball = base_tarball()
    key = tarball.stem
    name = base_name()
    found = podman(
        "image",
        "inspect",
        "--format",
        '{{index .Config.Labels "' + LABEL + '.base"}}',
        name,
        check=False,
    )
    if found.returncode == 0 and found.stdout.strip() == key:
        return
    changes = [*BASE_CHANGES, f"LABEL {LABEL}.base={key}"]
    podman("import", *(f"--change={change}" for change in changes), str(tarball), name, timeout=300)


def build(tag: str, *options: str) -> str:
    """Build the Dockerfile as ``tag`` (Docker's format, which keeps HEALTHCHECK); its log."""
    mounts = ["--volume", f"{HOST_CAS}:{HOST_CAS}:ro"] if HOST_CAS.exists() else []
    result = podman(
        "build",
        "--pull=never",
        "--format",
        "docker",
        "--layers",
        *limits(),
        *mounts,
        *options,
        "--tag",
        tag,
        str(REPO),
        timeout=900,
    )
    return result.stdout + result.stderr


@dataclass
class Images:
    """The image built with the default user, another built with ``UID=OTHER_UID``, and the
    second build's log."""

    default: str
    other: str
    other_log: str


def remove_containers(*filters: str) -> None:
    """Remove (stopping them at once) the containers these filters match."""
    found = podman("ps", "--all", "--quiet", *(f"--filter={f}" for f in filters), check=False)
    ids = found.stdout.split()
    if ids:
        podman("rm", "--force", "--time", "0", *ids, check=False, timeout=120)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    """Both images, built once for the module; afterwards no container of this session is
    left, and old layers no image uses are pruned."""
    reason = missing_tools()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the container image cannot be built: {reason}")
        pytest.skip(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        remove_containers("status=exited", f"label={LABEL}")  # left by an interrupted run
        import_base()
        build("localhost/neurotrale-test:default")
        log = build("localhost/neurotrale-test:other", "--build-arg", f"UID={OTHER_UID}")
        yield Images("localhost/neurotrale-test:default", "localhost/neurotrale-test:other", log)
    finally:
        remove_containers(f"label={LABEL}={SESSION}")
        podman("image", "prune", "--force", check=False, timeout=300)


@dataclass
class Container:
    """A running container: its name and the host ports its container ports are published on."""

    name: str
    ports: dict[int, int]

    def url(self, port: int = 9000) -> str:
        """The URL of container port ``port`` from the host."""
        return f"http://127.0.0.1:{self.ports[port]}"

    def logs(self) -> str:
        """What the server wrote (its log)."""
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> tuple[str, int]:
        """Its status (``running``, ``exited``...) and exit code."""
        result = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name)
        status, code = result.stdout.split()
        return status, int(code)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK, run now, as podman's timer would."""
        return podman("healthcheck", "run", self.name, check=False, timeout=60)


@contextmanager
def container(
    image: str,
    data: Path,
    *args: str,
    ports: tuple[int, ...] = (9000,),
    workers: int = 2,
    volumes: tuple[str, ...] = (),
) -> Iterator[Container]:
    """Run ``image`` with ``data`` as /data and ``args`` after the image name, publish
    ``ports`` on 127.0.0.1, and wait until its ``workers`` processes serve; removed after."""
    name = f"neurotrale-test-{SESSION}-{uuid.uuid4().hex[:8]}"
    published = {port: free_port() for port in ports}
    options = [f"--publish=127.0.0.1:{host}:{port}" for port, host in published.items()]
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--label",
        f"{LABEL}={SESSION}",
        "--health-interval=disable",  # no systemd timer here; the test runs the check
        *limits(),
        "--volume",
        f"{data}:/data",
        *(f"--volume={volume}" for volume in volumes),
        *options,
        image,
        "--workers",
        str(workers),
        *args,
    )
    running = Container(name, published)
    try:

        def ready() -> bool:
            logs = running.logs()
            if running.state()[0] != "running":
                raise AssertionError(f"the container stopped:\n{logs}")
            serving = len(re.findall(r"worker \d+ serving on", logs))
            return "NeurotraleSite" in logs and serving >= workers - 1

        wait_for(ready, 90, "the container's server")
        yield running
    finally:
        print(running.logs())  # shown when the test fails
        podman("rm", "--force", "--time", "0", name, check=False)


def owned_demo_root(directory: Path, uid: int) -> Path:
    """A data root with the demo dataset, owned by ``uid`` (the container's user)."""
    root = directory / f"data-{uid}"
    root.mkdir()
    write_demo(root)
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)
    return root


def expected_chunk() -> bytes:
    """The demo's first chunk as a client must receive it (x 0-64, y 0-64, z 0-32)."""
    volume = microscopy_volume(DEMO_SIZE)
    return raw_of(volume[np.newaxis, 0:32, 0:64, 0:64])


def put_annotation(url: str, name: str, records: list[dict[str, object]]) -> tuple[int, bytes]:
    """PUT ``records`` as the annotation file ``name`` of the demo's block x0y0z0."""
    status, _, body = get(
        f"{url}/demo-brain/annotations/x0y0z0/{name}", json.dumps(records).encode(), "PUT"
    )
    return status, body


RECORDS: list[dict[str, object]] = [{"point": [1.5, 2.5, 40], "type": "point", "id": "from-test"}]


def test_the_image_serves_the_data_root_on_port_9000(images: Images, tmp_path: Path) -> None:
    data = owned_demo_root(tmp_path, DEFAULT_UID)
    with container(images.default, data) as server:
        status, headers, body = get(server.url() + "/healthz")
        assert status == 200
        assert json.loads(body)["status"] == "ok"
        status, headers, body = get(server.url() + CHUNK)
        assert status == 200
        assert headers["Content-Type"] == "application/octet-stream"
        assert body == expected_chunk()
        status, body = put_annotation(server.url(), "z-0040.json", RECORDS)
        assert (status, json.loads(body)) == (201, {"filename": "z-0040.json", "count": 1})
        written = data / "demo-brain" / "annotations" / "x0y0z0" / "z-0040.json"
        assert json.loads(written.read_text()) == RECORDS
        assert (written.stat().st_uid, written.stat().st_gid) == (DEFAULT_UID, DEFAULT_UID)
        check = server.healthcheck()
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_health_check_fails_when_the_server_does_not_answer(
    images: Images, tmp_path: Path
) -> None:
    data = owned_demo_root(tmp_path, DEFAULT_UID)
    with container(images.default, data, "--listen", "unix:/tmp/neurotrale.sock") as server:
        check = server.healthcheck()
        assert check.returncode == 0, check.stdout + check.stderr
        # The server answers on its socket and nowhere else: without it, the check fails.
        podman("exec", server.name, "rm", "/tmp/neurotrale.sock")
        check = server.healthcheck()
        assert check.returncode == 1
        assert "unhealthy" in check.stdout + check.stderr


def test_the_health_check_of_a_server_on_tls_only(images: Images, tmp_path: Path) -> None:
    data = owned_demo_root(tmp_path, DEFAULT_UID)
    certificates = tmp_path / "certificates"
    certificates.mkdir()
    key, cert = self_signed(certificates)
    key.chmod(0o644)  # readable by the container's user (a test key)
    certificates.chmod(0o755)
    listen = "ssl:9443:privateKey=/certificates/key.pem:certKey=/certificates/cert.pem"
    assert (key.name, cert.name) == ("key.pem", "cert.pem")
    with container(
        images.default,
        data,
        "--listen",
        listen,
        ports=(9443,),
        volumes=(f"{certificates}:/certificates:ro",),
    ) as server:
        check = server.healthcheck()
        assert check.returncode == 0, check.stdout + check.stderr


def test_workers_and_port_after_the_image_name(images: Images, tmp_path: Path) -> None:
    data = owned_demo_root(tmp_path, DEFAULT_UID)
    with container(images.default, data, "--port", "9100", ports=(9100, 9000), workers=3) as server:
        check = server.healthcheck()
        assert check.returncode == 0, check.stdout + check.stderr

        def worker(_: int) -> str:
            headers = get(server.url(9100) + "/healthz")[1]
            return str(headers["X-Neurotrale-Worker"]).split(";")[0]

        answered: set[str] = set()
        with ThreadPoolExecutor(12) as pool:
            for _ in range(20):  # until every process answered, at most 600 requests
                answered |= set(pool.map(worker, range(30)))
                if len(answered) >= 3:
                    break
        assert answered == {"0", "1", "2"}  # the parent and two workers
        # --port replaces 9000: nothing listens there.
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url(9000) + "/healthz", timeout=10)


def test_an_unknown_option_stops_the_container_at_once(images: Images, tmp_path: Path) -> None:
    data = owned_demo_root(tmp_path, DEFAULT_UID)
    name = f"neurotrale-test-{SESSION}-unknown"
    started = time.monotonic()
    try:
        result = podman(
            "run",
            "--name",
            name,
            "--label",
            f"{LABEL}={SESSION}",
            *limits(),
            "--volume",
            f"{data}:/data",
            images.default,
            "--workers",
            "2",
            "--frobnicate",
            check=False,
            timeout=120,
        )
        elapsed = time.monotonic() - started
        assert result.returncode not in (0, 125, 126, 127), result.stderr  # the server's refusal
        assert "frobnicate" in result.stdout + result.stderr
        assert elapsed < 30
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_podman_stop_stops_the_server_cleanly(images: Images, tmp_path: Path) -> None:
    data = owned_demo_root(tmp_path, DEFAULT_UID)
    with container(images.default, data) as server:
        assert get(server.url() + "/healthz")[0] == 200
        started = time.monotonic()
        podman("stop", "--time", "20", server.name, timeout=60)
        elapsed = time.monotonic() - started
        # Exit status 0: SIGTERM stopped it; a SIGKILL after the 20 s would read 137.
        assert server.state() == ("exited", 0)
        assert elapsed < 20
        assert "Server Shut Down." in server.logs()


def test_another_uid_rebuilds_only_the_user_and_writes_as_that_user(
    images: Images, tmp_path: Path
) -> None:
    # The second build came after the first: every step before ARG UID from the cache.
    assert "Successfully installed" not in images.other_log
    assert "Collecting" not in images.other_log
    assert images.other_log.count("Using cache") >= 8, images.other_log
    user = podman("image", "inspect", "--format", "{{.Config.User}}", images.other).stdout
    assert user.strip() == f"{OTHER_UID}:{OTHER_UID}"
    data = owned_demo_root(tmp_path, OTHER_UID)
    with container(images.other, data) as server:
        status, _ = put_annotation(server.url(), "z-0050.json", RECORDS)
        assert status == 201
        written = data / "demo-brain" / "annotations" / "x0y0z0" / "z-0050.json"
        assert (written.stat().st_uid, written.stat().st_gid) == (OTHER_UID, OTHER_UID)
        assert json.loads(written.read_text()) == RECORDS


def test_the_build_context_holds_what_the_image_copies_and_nothing_private(
    images: Images, tmp_path: Path
) -> None:
    # The same context and .dockerignore as the image's build, copied whole into an image.
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text(f"FROM {base_name()}\nCOPY . /context\n")
    tag = "localhost/neurotrale-test:context"
    build(tag, "--file", str(containerfile))
    try:
        listing = podman(
            "run", "--rm", *limits(), "--entrypoint", "find", tag, "/context", "-printf", "%P\\n"
        ).stdout.split()
    finally:
        podman("rmi", "--force", tag, check=False)
    copied = set(listing)
    sources = re.findall(r"^COPY (?:--\S+ )*(\S+) ", (REPO / "Dockerfile").read_text(), re.M)
    for source in sources:
        assert source in copied, source
    assert "neurotrale_twisted/__init__.py" in copied
    assert "twisted/plugins/neurotrale_plugin.py" in copied
    private = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}
    private |= {".pytest_cache", ".hypothesis", "dropin.cache", "demo-data"}
    assert not {part for path in copied for part in path.split("/")} & private
