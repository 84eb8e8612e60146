"""Benchmark: throughput and browser views of ``twistd neurotrale`` against nginx and the original.

One command, one run, side by side on the same files (a 512x512x256 uint16 volume of
light-sheet-like data, 64^3 chunks of 512 KiB, uncompressed TIFFs):

- ``nginx``: nginx serving the TIFF files with ``sendfile`` (the machine's limit);
- ``nginx gzip``: the same with ``gzip on; gzip_comp_level 1`` (what an operator would put in
  front of a server to compress);
- ``original``: the original service's method (``bench/reference_server.py``: uvicorn
  ``--workers 2``, a FastAPI route doing ``tifffile.imread(path).tobytes()``, FastAPI's
  ``GZipMiddleware`` at its default level);
- ``neurotrale``: this server, ``--workers 2``, default settings.

It measures throughput with wrk (``-t1 -c32``; identity and browser encodings; cold: cycling
all 256 chunks, more than the cache holds; warm: cycling one view's 32 chunks), and **views**:
the 32 chunks of one 4x4x2 block requested as a browser does (all 32 queued at once over 6
keep-alive HTTP/1.1 connections, each answer decoded by the client before the view counts
as loaded), over a loopback shaped to 1 Gbit/s and to 100 Mbit/s. Cold views cycle through
7 disjoint blocks (no server cache can hold them); warm views repeat one block. With
haproxy installed, views also go to this server through ``contrib/haproxy/h2.cfg`` (TLS):
over six HTTP/1.1 connections, and over one HTTP/2 connection with all 32 requests as
streams at once (httpx with h2, a Python client: a browser's is faster).

Everything runs in a network namespace of its own (``ip netns add``), on its loopback only,
shaped with a ``tbf`` qdisc (this kernel has no ``netem``), and the namespace is deleted at
exit. Needs root, Debian's ``nginx``, ``wrk`` and ``iproute2``, and the ``bench`` extra.

    sudo python bench/views_bench.py            # the full run, about 11 minutes
    sudo python bench/views_bench.py --quick    # a smoke run, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chunks_bench import (  # noqa: E402 - the sibling module, found through the path above
    BROWSER,
    Result,
    free_port,
    make_volume,
    nginx_config,
    rss_of_tree,
    run_wrk,
    wait_for,
    write_dataset,
)

#: The links the views run over: name, and the tbf rate (None: the loopback as it is).
LINKS = [("1 Gbit/s", "1gbit"), ("100 Mbit/s", "100mbit")]
CONNECTIONS = 6
VIEW_BLOCK = (4, 4, 2)  # chunks along x, y, z: 32 chunks


# --- the network namespace ------------------------------------------------------------------


def shape(rate: str | None) -> None:
    """Shape this namespace's loopback to ``rate`` (tc's spelling), or unshape it (None)."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)
    if rate is not None:
        subprocess.run(
            ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
             "burst", "256kb", "latency", "50ms"],
            check=True,
        )  # fmt: skip


def run_in_namespace(argv: list[str]) -> int:
    """Run this script again (``--inside``) in a network namespace of its own; delete it after.

    Whatever is left running in the namespace when the run ends is killed, by its id.
    """
    name = f"neurotrale-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        child = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, __file__, "--inside", *argv]
        )
        return child.wait()
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        left = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


# --- the servers ----------------------------------------------------------------------------


@dataclass
class Servers:
    """The ports of the servers under test, and their processes."""

    ports: dict[str, int]
    processes: list[subprocess.Popen[bytes]]
    neurotrale: subprocess.Popen[bytes]
    #: haproxy's certificate (None: no haproxy installed, no HTTP/2 views).
    tls: Path | None


@contextmanager
def servers(data: Path, tmp: Path, workers: int, server_args: list[str]) -> Iterator[Servers]:
    """Start nginx (two servers), the original's method and this server; stop them after."""
    ports = {name: free_port() for name in ("nginx", "nginx gzip", "original", "neurotrale")}
    log = open(tmp / "servers.log", "w")  # noqa: SIM115 - closed below
    bindir = Path(sys.executable).parent
    conf = nginx_config(data, tmp, ports["nginx"], ports["nginx gzip"], workers)
    processes = [subprocess.Popen(["nginx", "-c", str(conf)], stdout=log, stderr=log)]
    processes.append(
        subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "reference_server:app",
             "--workers", str(workers), "--host", "127.0.0.1", "--port", str(ports["original"]),
             "--no-access-log", "--log-level", "warning"],
            env={**os.environ, "NEUROTRALE_REFERENCE_ROOT": str(data)},
            stdout=log,
            stderr=log,
        )
    )  # fmt: skip
    neurotrale = subprocess.Popen(
        [str(bindir / "twistd"), "-n", "--pidfile=", f"--logfile={tmp / 'neurotrale.log'}",
         "neurotrale", "--path", str(data),
         "--listen", f"tcp:{ports['neurotrale']}:interface=127.0.0.1:backlog=1024",
         "--workers", str(workers), *server_args],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    processes.append(neurotrale)
    tls: Path | None = None
    if shutil.which("haproxy"):
        # This server behind haproxy (contrib/haproxy/h2.cfg): TLS, ALPN h2 and http/1.1.
        cert, key, pem = tmp / "cert.pem", tmp / "key.pem", tmp / "haproxy.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        tls = cert
        ports["haproxy"] = free_port()
        processes.append(
            subprocess.Popen(
                ["haproxy", "-db", "-f", str(HERE.parent / "contrib" / "haproxy" / "h2.cfg")],
                env={
                    **os.environ,
                    "NEUROTRALE_SERVER": f"127.0.0.1:{ports['neurotrale']}",
                    "NEUROTRALE_PROXY_BIND": f"127.0.0.1:{ports['haproxy']}",
                    "NEUROTRALE_TLS_PEM": str(pem),
                },
                stdout=log,
                stderr=log,
            )
        )
    try:
        yield Servers(ports, processes, neurotrale, tls)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


# --- the browser-like client ----------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection, asking for one path at a time, as a browser does."""

    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        self.port = port
        self.tls = tls
        self.host = f"127.0.0.1:{port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection (over TLS to ``localhost`` with a context)."""
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1",
            self.port,
            limit=1 << 20,
            ssl=self.tls,
            server_hostname="localhost" if self.tls is not None else None,
        )

    async def get(self, path: str, accept: str | None) -> tuple[int, bytes]:
        """GET ``path``; return the bytes received for the body and the decoded body.

        A kept-alive connection the server closed before answering is opened again and the
        request sent once more, as browsers do.
        """
        headers = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: keep-alive\r\n"
        if accept is not None:
            headers += f"Accept-Encoding: {accept}\r\n"
        request = (headers + "\r\n").encode()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            await self.connect()
            assert self.reader is not None and self.writer is not None
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        reader = self.reader
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        if fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from these servers
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await reader.readexactly(int(fields.get("content-length", "0")))
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return len(body), decode(body, fields.get("content-encoding"))

    def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()


def decode(body: bytes, coding: str | None) -> bytes:
    """The body, decoded from its ``Content-Encoding`` as a browser would."""
    if coding in (None, "", "identity"):
        return body
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if coding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return zlib.decompress(body)
    raise RuntimeError(f"the client cannot decode {coding!r}")


async def open_connections(
    port: int, count: int, tls: ssl.SSLContext | None = None
) -> list[Connection]:
    """``count`` connections to the server on this loopback's ``port`` (over TLS with ``tls``,
    to ``localhost``)."""
    connections = [Connection(port, tls) for _ in range(count)]
    for connection in connections:
        await connection.connect()
    return connections


async def load_view(
    connections: list[Connection], paths: list[str], accept: str | None, sizes: dict[str, int]
) -> tuple[float, int]:
    """Load one view: every path queued at once, each connection taking the next when free.

    Returns the seconds until the last answer was decoded, and the bytes of bodies received.
    """
    queue = deque(paths)
    received = 0

    async def drain(connection: Connection) -> None:
        nonlocal received
        while queue:
            path = queue.popleft()
            wire, body = await connection.get(path, accept)
            if len(body) != sizes[path]:
                raise RuntimeError(f"GET {path}: {len(body)} bytes, not {sizes[path]}")
            received += wire

    started = time.perf_counter()
    await asyncio.gather(*(drain(c) for c in connections))
    return time.perf_counter() - started, received


@dataclass
class ViewResult:
    """Views of one case: the median time and the bytes a view moved."""

    seconds: float
    runs: list[float]
    wire_bytes: int


async def load_view_http2(
    client: httpx.AsyncClient,
    base: str,
    paths: list[str],
    accept: str | None,
    sizes: dict[str, int],
) -> tuple[float, int]:
    """:func:`load_view` over one HTTP/2 connection: every request sent at once as a stream
    (httpx decodes the answers)."""
    headers = {"Accept-Encoding": accept or "identity"}
    started = time.perf_counter()
    responses = await asyncio.gather(*(client.get(base + p, headers=headers) for p in paths))
    seconds = time.perf_counter() - started
    for path, response in zip(paths, responses, strict=True):
        if response.status_code != 200 or len(response.content) != sizes[path]:
            raise RuntimeError(f"GET {path}: {response.status_code}, {len(response.content)} B")
        if response.http_version != "HTTP/2":
            raise RuntimeError(f"GET {path}: {response.http_version}, not HTTP/2")
    return seconds, sum(r.num_bytes_downloaded for r in responses)


def measure_views(
    port: int,
    views: list[list[str]],
    accept: str | None,
    repeat: int,
    sizes: dict[str, int],
    transport: str = "http/1.1",
    tls: Path | None = None,
) -> ViewResult:
    """Load each of ``views`` in turn, ``repeat`` views in all; the median seconds.

    ``sizes`` are the decoded bodies' lengths by path. ``transport`` is ``http/1.1`` (six
    connections, over TLS trusting the certificate ``tls``) or ``h2`` (one connection, TLS).
    Each gets a TLS context of its own: httpx sets its ALPN protocols on the context it is
    given, and an HTTP/1.1 client on that context would be offered h2.
    """

    async def main_http2() -> ViewResult:
        base = f"https://localhost:{port}"
        context = ssl.create_default_context(cafile=str(tls))
        async with httpx.AsyncClient(http2=True, verify=context, timeout=120) as client:
            await client.get(base + "/healthz")  # the connection, opened before the views
            times = []
            wire = 0
            for i in range(repeat):
                seconds, wire = await load_view_http2(
                    client, base, views[i % len(views)], accept, sizes
                )
                times.append(seconds)
            return ViewResult(statistics.median(times), times, wire)

    async def main() -> ViewResult:
        if transport == "h2":
            return await main_http2()
        context = None
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls))
            context.set_alpn_protocols(["http/1.1"])
        connections = await open_connections(port, CONNECTIONS, context)
        try:
            times = []
            wire = 0
            for i in range(repeat):
                seconds, wire = await load_view(connections, views[i % len(views)], accept, sizes)
                times.append(seconds)
            return ViewResult(statistics.median(times), times, wire)
        finally:
            for connection in connections:
                connection.close()

    return asyncio.run(main())


# --- the run --------------------------------------------------------------------------------


def view_blocks(paths: list[str], grid: tuple[int, int, int]) -> list[list[str]]:
    """The chunk paths of each disjoint ``VIEW_BLOCK`` of a grid of chunks."""
    by_origin = {}
    for path in paths:
        xs, ys, zs = path.rsplit("/", 1)[1].split("_")
        by_origin[(int(xs.split("-")[0]), int(ys.split("-")[0]), int(zs.split("-")[0]))] = path
    step = sorted({x for x, _, _ in by_origin})
    chunk = step[1] - step[0]
    bx, by, bz = VIEW_BLOCK
    blocks = []
    for z0 in range(0, grid[2], bz):
        for y0 in range(0, grid[1], by):
            for x0 in range(0, grid[0], bx):
                blocks.append(
                    [
                        by_origin[(x * chunk, y * chunk, z * chunk)]
                        for z in range(z0, z0 + bz)
                        for y in range(y0, y0 + by)
                        for x in range(x0, x0 + bx)
                    ]
                )
    return blocks


def wait_for_workers(log: Path, workers: int, timeout: float = 120) -> None:
    """Wait until every worker of ``twistd neurotrale`` says it serves (its log says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if "NeurotraleSite starting" in text and text.count(" serving on ") >= workers - 1:
            time.sleep(0.5)
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server's {workers} workers did not start: see {log}")


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by the processes ``pids`` and all their descendants."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo += [
            int(child)
            for child in subprocess.run(
                ["pgrep", "-P", str(pid)], capture_output=True, text=True
            ).stdout.split()
        ]
    return total


def settle(pids: list[int], timeout: float = 120) -> None:
    """Wait until the servers are idle: a server still working off the requests of the last
    case (the original's gzip level 9 goes on after wrk has gone) would slow the next case."""
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu_seconds(pids)
        if now - before < 0.05:  # under a tenth of a core
            return
        before = now


def machine() -> str:
    """The machine, in a line: cores, CPU model, memory, kernel, Python."""
    model = "?"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def inside(args: argparse.Namespace) -> None:
    """The benchmark proper, run in the namespace."""
    shape(None)
    duration = 2 if args.quick else args.duration
    repeat = 3 if args.quick else args.repeat
    rounds_of_each = 1 if args.quick else args.rounds
    size = (512, 512, 256)
    chunk = 64
    grid = (size[0] // chunk, size[1] // chunk, size[2] // chunk)
    chunk_bytes = chunk**3 * 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {started}; {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="neurotrale-views-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx's workers run as another user
        data = tmp / "data"
        paths = write_dataset(data, "raw", make_volume(size), chunk, "none")
        blocks = view_blocks(paths, grid)
        url_files = {"cold": tmp / "cold.urls", "warm": tmp / "warm.urls"}
        url_files["cold"].write_text("\n".join(paths) + "\n")
        url_files["warm"].write_text("\n".join(blocks[0]) + "\n")
        with servers(data, tmp, args.workers, args.server_args.split()) as running:
            for name, port in running.ports.items():
                if name != "haproxy":
                    try:
                        wait_for(f"http://127.0.0.1:{port}{paths[0]}")
                    except RuntimeError:
                        for log in sorted(tmp.glob("*.log")):
                            print(f"--- {log.name}:\n{log.read_text()[-3000:]}", flush=True)
                        raise RuntimeError(f"{name} on port {port} did not answer") from None
            wait_for_workers(tmp / "neurotrale.log", args.workers)
            sizes = {p: (data / (p.lstrip("/") + ".tiff")).stat().st_size for p in paths}
            voxels = dict.fromkeys(paths, chunk_bytes)
            server_pids = [p.pid for p in running.processes]
            throughput: dict[tuple[str, str, str], Result] = {}
            cases = [
                ("nginx", "identity"),
                ("nginx gzip", "browser"),
                ("original", "identity"),
                ("original", "browser"),
                ("neurotrale", "identity"),
                ("neurotrale", "browser"),
            ]
            # Rounds of every case in turn, the median round of each kept: the host's load
            # drifts, and a pool's connections may land unevenly on its processes in a round.
            for temperature in ("cold", "warm"):
                rounds: dict[tuple[str, str, str], list[Result]] = {}
                for round_number in range(1, rounds_of_each + 1):
                    for server, encoding in cases:
                        headers = {"Accept-Encoding": BROWSER} if encoding == "browser" else {}
                        base = f"http://127.0.0.1:{running.ports[server]}"
                        urls = url_files[temperature]
                        run_wrk(base, urls, 32, 1, headers, threads=1)  # warm up
                        settle(server_pids)
                        result = run_wrk(base, urls, 32, duration, headers, threads=1)
                        rounds.setdefault((server, encoding, temperature), []).append(result)
                        settle(server_pids)
                        print(
                            f"wrk {server:<11} {encoding:<8} {temperature:<4} "
                            f"round {round_number} {result.rps:>8.0f} req/s "
                            f"{result.mbps:>7.1f} MB/s p50 {result.p50_ms:>6.1f} ms "
                            f"p99 {result.p99_ms:>6.1f} ms errors {result.errors}",
                            flush=True,
                        )
                for case, results in rounds.items():
                    throughput[case] = sorted(results, key=lambda r: r.rps)[len(results) // 2]
            # RSS under 100 connections, the worst case for memory: browser encodings, cold.
            run_wrk(
                f"http://127.0.0.1:{running.ports['neurotrale']}", url_files["cold"], 100,
                duration, {"Accept-Encoding": BROWSER}, threads=1,
            )  # fmt: skip
            rss = [round(kb / 1024) for kb in rss_of_tree(running.neurotrale.pid)]
            settle(server_pids)
            print(f"# neurotrale max RSS per process after 100 connections (MB): {rss}")
            views: dict[tuple[str, str, str, str], ViewResult] = {}
            # Cold views cycle through the blocks but the warm one, each case going on from
            # where the last one stopped: a block comes back after six others, when no cache
            # holds it any more.
            cold_blocks = blocks[1:]
            cursor = 0
            view_cases = [(server, encoding, server, "http/1.1") for server, encoding in cases]
            if running.tls is not None:
                # This server behind haproxy over TLS: six HTTP/1.1 connections, or one HTTP/2.
                view_cases += [
                    ("haproxy 6 x h1", "browser", "haproxy", "http/1.1+tls"),
                    ("haproxy 1 x h2", "browser", "haproxy", "h2"),
                ]
            for link, rate in LINKS:
                shape(rate)
                for temperature in ("cold", "warm"):
                    for server, encoding, target, transport in view_cases:
                        accept = BROWSER if encoding == "browser" else None
                        port = running.ports[target]
                        # nginx sends the TIFF files as stored; the others, the voxels.
                        expected = sizes if server.startswith("nginx") else voxels
                        how = {
                            "transport": "h2" if transport == "h2" else "http/1.1",
                            "tls": running.tls if transport != "http/1.1" else None,
                        }
                        if temperature == "warm":
                            chosen = blocks[:1]
                            measure_views(port, chosen, accept, 3, expected, **how)  # type: ignore[arg-type]
                        else:
                            chosen = cold_blocks[cursor:] + cold_blocks[:cursor]
                            cursor = (cursor + repeat) % len(cold_blocks)
                        settle(server_pids)
                        result = measure_views(port, chosen, accept, repeat, expected, **how)  # type: ignore[arg-type]
                        views[(server, encoding, temperature, link)] = result
                        print(
                            f"view {link:<10} {server:<14} {encoding:<8} {temperature:<4} "
                            f"median {result.seconds:.3f} s "
                            f"({', '.join(f'{t:.3f}' for t in result.runs)}) "
                            f"{result.wire_bytes / 2**20:.1f} MiB",
                            flush=True,
                        )
            shape(None)
    print()
    print(report(throughput, views, rss, started))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "started": started,
                    "machine": machine(),
                    "throughput": {" ".join(k): vars(v) for k, v in throughput.items()},
                    "views": {" ".join(k): vars(v) for k, v in views.items()},
                    "rss_mb": rss,
                },
                indent=1,
            )
        )


def report(
    throughput: dict[tuple[str, str, str], Result],
    views: dict[tuple[str, str, str, str], ViewResult],
    rss: list[int],
    started: str,
) -> str:
    """The results as Markdown tables, with ratios to nginx and to the original's method."""
    out = [f"Run of {started}; {machine()}.", ""]
    out.append(
        "| server | encoding | cold req/s | x nginx | x original identity | warm req/s | x nginx |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|")
    nginx = {t: throughput[("nginx", "identity", t)].rps for t in ("cold", "warm")}
    original = throughput[("original", "identity", "cold")].rps
    for (server, encoding, temperature), result in throughput.items():
        if temperature != "cold":
            continue
        warm = throughput[(server, encoding, "warm")].rps
        out.append(
            f"| {server} | {encoding} | {result.rps:,.0f} | {result.rps / nginx['cold']:.2f} | "
            f"{result.rps / original:.2f} | {warm:,.0f} | {warm / nginx['warm']:.2f} |"
        )
    out.append("")
    out.append(
        "| view of 32 chunks | encoding | cold s | warm s | MiB moved | cold x nginx | "
        "cold x nginx gzip | warm x nginx | warm x nginx gzip |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for link, _ in LINKS:
        for server, encoding in dict.fromkeys((s, e) for s, e, _, _ in views):
            cold = views[(server, encoding, "cold", link)]
            warm = views[(server, encoding, "warm", link)]

            def faster(base: str, temperature: str, mine: ViewResult, link: str = link) -> str:
                key = (base, "identity" if base == "nginx" else "browser", temperature, link)
                return f"{views[key].seconds / mine.seconds:.2f}"

            out.append(
                f"| {server}, {link} | {encoding} | {cold.seconds:.3f} | {warm.seconds:.3f} | "
                f"{cold.wire_bytes / 2**20:.1f} | {faster('nginx', 'cold', cold)} | "
                f"{faster('nginx gzip', 'cold', cold)} | {faster('nginx', 'warm', warm)} | "
                f"{faster('nginx gzip', 'warm', warm)} |"
            )
    out.append("")
    out.append(
        "View ratios are speed-ups: the other server's time over this row's (above 1: this "
        f"row is faster). Max RSS per neurotrale process after 100 connections: {rss} MB."
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s, 3 views a case")
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="wrk runs per case (the median is shown)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="views loaded per case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server-args", default="", help="extra twistd neurotrale options")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        sys.exit("needs root: it makes a network namespace and shapes its loopback")
    sys.exit(run_in_namespace(sys.argv[1:]))


if __name__ == "__main__":
    main()
