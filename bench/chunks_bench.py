"""Benchmark: chunk throughput of ``twistd neurotrale`` against nginx on the same files.

Generates a microscopy-like uint16 volume (default 512x512x256, 64^3 chunks) as uncompressed
and zlib TIFF datasets, starts nginx (``try_files $uri $uri.tiff``, sendfile), the server
(``--workers 2``) and the naive baseline (``bench/naive_server.py``), drives each with wrk
cycling through the chunk URLs, and prints requests/s, MB/s, p50/p99 latency and the ratio to
nginx measured in the same run. Needs Debian's ``nginx`` and ``wrk`` on PATH.

    python bench/chunks_bench.py [--duration 10] [--connections 16,100] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurotrale_twisted.tools.ingest.pyramid import write_volume

HERE = Path(__file__).resolve().parent
BROWSER = "gzip, deflate, br, zstd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_volume(size: tuple[int, int, int], seed: int = 1) -> np.ndarray:  # type: ignore[type-arg]
    """A (z, y, x) uint16 volume that compresses about 2x with zlib, like light-sheet data."""
    rng = np.random.default_rng(seed)
    x, y, z = size
    # Dim camera noise almost everywhere, bright structures over part of the volume.
    base = rng.normal(110, 4, (z, y, x))
    zz, yy, xx = np.ogrid[0:z, 0:y, 0:x]
    wave = (np.sin(xx / 9.0) * np.cos(yy / 13.0) + np.sin(zz / 7.0 + xx / 31.0)) ** 2
    signal = np.where(wave > 0.45 * wave.max(), 2000 * wave, 0)
    return np.clip(base + signal, 0, 65535).astype(np.uint16)


def write_dataset(
    root: Path, name: str, volume: np.ndarray, chunk: int, compression: str
) -> list[str]:  # type: ignore[type-arg]
    """Write one precomputed-tif dataset of one scale; return its chunk URL paths."""
    write_volume(root / name, volume, 1, (chunk, chunk, chunk), (1.8, 1.8, 2.0), compression)
    directory = root / name / "1_1_1"
    urls = sorted(f"/{name}/1_1_1/{path.stem}" for path in directory.glob("*.tiff"))
    return urls


@dataclass
class Result:
    """One wrk run."""

    rps: float
    mbps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    """wrk's latency text (``812.00us``, ``3.92ms``, ``1.02s``, ``1.50m``) in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"cannot read wrk latency {text!r}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match.group(2)]
    return float(match.group(1)) * scale


def run_wrk(
    base: str,
    urls_file: Path,
    connections: int,
    duration: int,
    headers: dict[str, str],
    threads: int = 2,
) -> Result:
    """Drive ``base`` with wrk cycling through the URLs; parse what it prints."""
    args = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--latency",
        "--timeout",
        "30s",
        "-s",
        str(HERE / "cycle.lua"),
    ]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*args, base],
        capture_output=True,
        text=True,
        env={**os.environ, "URLS": str(urls_file)},
        check=True,
    ).stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert transfer is not None
    scale = {"B": 1e-6, "KB": 1e-3 * 1.024, "MB": 1.048576, "GB": 1073.741824}[transfer.group(2)]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    n_errors = int(errors.group(1)) if errors else 0
    if socket_errors:
        n_errors += sum(int(g) for g in socket_errors.groups())
    return Result(
        rps,
        float(transfer.group(1)) * scale,
        _ms(p50.group(1)) if p50 else 0,
        _ms(p99.group(1)) if p99 else 0,
        n_errors,
    )


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def nginx_config(root: Path, tmp: Path, plain_port: int, gzip_port: int, workers: int) -> Path:
    """One nginx, two servers on the same files: sendfile, and sendfile plus gzip level 1."""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{plain_port};
        root {root};
        location / {{ try_files $uri $uri.tiff =404; }}
    }}
    server {{
        listen 127.0.0.1:{gzip_port};
        root {root};
        gzip on;
        gzip_comp_level 1;
        gzip_types application/octet-stream;
        location / {{ try_files $uri $uri.tiff =404; }}
    }}
}}
""")
    return conf


def start_nginx(root: Path, port: int, workers: int, tmp: Path) -> subprocess.Popen[bytes]:
    """nginx serving ``root`` with sendfile on ``port`` (its gzip server on a spare port)."""
    conf = nginx_config(root, tmp, port, free_port(), workers)
    return subprocess.Popen(["nginx", "-c", str(conf)])


def rss_of_tree(pid: int) -> list[int]:
    """Max RSS (kB, VmHWM) of a process and its children."""
    pids = [pid] + [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    result = []
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmHWM:\s+(\d+)", status)
        if match:
            result.append(int(match.group(1)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512,512,256")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", default="16,100")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warm-set", type=int, default=48, help="chunks in the warm working set")
    parser.add_argument("--server-args", default="", help="extra twistd neurotrale options")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--only-nginx-and-raw", action="store_true", help="a quick check")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    connections = [int(c) for c in args.connections.split(",")]
    twistd = str(Path(sys.executable).parent / "twistd")

    with tempfile.TemporaryDirectory(prefix="neurotrale-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx's workers run as another user
        data = tmp / "data"
        volume = make_volume(size)  # type: ignore[arg-type]
        urls = {
            "raw": write_dataset(data, "raw", volume, args.chunk, "none"),
            "zlib": write_dataset(data, "zlib", volume, args.chunk, "zlib"),
        }
        raw_bytes = sum(f.stat().st_size for f in (data / "raw").rglob("*.tiff"))
        zlib_bytes = sum(f.stat().st_size for f in (data / "zlib").rglob("*.tiff"))
        url_files = {}
        for name, paths in urls.items():
            url_files[name] = tmp / f"{name}.urls"
            url_files[name].write_text("\n".join(paths) + "\n")
            url_files[name + "-warm"] = tmp / f"{name}-warm.urls"
            url_files[name + "-warm"].write_text("\n".join(paths[: args.warm_set]) + "\n")
        print(
            f"# volume {size} uint16, {len(urls['raw'])} chunks of {args.chunk}^3; "
            f"zlib ratio {raw_bytes / zlib_bytes:.2f}",
            flush=True,
        )

        nginx_port, server_port, naive_port = free_port(), free_port(), free_port()
        processes = [start_nginx(data, nginx_port, args.workers, tmp)]
        server = subprocess.Popen(
            [
                twistd,
                "-n",
                "--pidfile=",
                "neurotrale",
                "--path",
                str(data),
                "--listen",
                f"tcp:{server_port}:interface=127.0.0.1",
                "--workers",
                str(args.workers),
                *args.server_args.split(),
            ],
            stdout=open(tmp / "server.log", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        processes.append(server)
        if not args.skip_naive:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "naive_server.py"), str(data), str(naive_port)]
                )
            )
        try:
            first = urls["raw"][0]
            wait_for(f"http://127.0.0.1:{nginx_port}{first}")
            wait_for(f"http://127.0.0.1:{server_port}{first}")
            if not args.skip_naive:
                wait_for(f"http://127.0.0.1:{naive_port}{first}")
            rows = []

            def measure(
                label: str, port: int, urls_key: str, c: int, headers: dict[str, str]
            ) -> Result:
                result = run_wrk(
                    f"http://127.0.0.1:{port}", url_files[urls_key], c, args.duration, headers
                )
                rows.append((label, c, result))
                print(
                    f"{label:<44} c={c:<4} {result.rps:>9.0f} req/s {result.mbps:>8.1f} MB/s "
                    f"p50 {result.p50_ms:>7.2f} ms p99 {result.p99_ms:>8.2f} ms "
                    f"errors {result.errors}",
                    flush=True,
                )
                return result

            for c in connections:
                ref = measure("nginx raw files (identity)", nginx_port, "raw", c, {})
                if args.only_nginx_and_raw:
                    measure("neurotrale uncompressed, identity, cold", server_port, "raw", c, {})
                    continue
                cases = [
                    ("uncompressed, identity, cold", "raw", {}),
                    ("uncompressed, identity, warm", "raw-warm", {}),
                    ("uncompressed, browser encodings, cold", "raw", {"Accept-Encoding": BROWSER}),
                    (
                        "uncompressed, browser encodings, warm",
                        "raw-warm",
                        {"Accept-Encoding": BROWSER},
                    ),
                    ("zlib TIFF, identity, cold", "zlib", {}),
                    ("zlib TIFF, identity, warm", "zlib-warm", {}),
                ]
                for label, key, headers in cases:
                    result = measure("neurotrale " + label, server_port, key, c, headers)
                    print(f"    ratio to nginx identity: {result.rps / ref.rps:.2f}", flush=True)
                if not args.skip_naive:
                    naive = measure("naive imread, zlib TIFF", naive_port, "zlib", c, {})
                    ours = next(
                        r
                        for label, cc, r in rows
                        if label == "neurotrale zlib TIFF, identity, cold" and cc == c
                    )
                    print(
                        f"    neurotrale zlib cold / naive: {ours.rps / naive.rps:.2f}", flush=True
                    )
            rss = rss_of_tree(server.pid)
            print(f"# neurotrale max RSS per process (MB): {[round(r / 1024) for r in rss]}")
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    main()
