"""Throughput of ``twistd neurotrale`` with 1, 2, 4, 8 worker processes, measured with wrk.

Not a test: run it by hand on the machine you want figures for (wrk from Debian:
``apt-get install wrk``), and copy the table it prints into docs/workers.md.

    python bench/workers.py                    # 1 2 4 8 workers, 10 s each, both datasets
    python bench/workers.py --workers 1 4 --seconds 20 --connections 64 --cache-mb 0

Each run starts a fresh server on a generated dataset (the demo volume, raw and
zlib-compressed TIFFs), with and without its chunk cache (``--cache-mb``; the demo's 36
chunks of scale 1_1_1 fit in it, so with the cache every answer after the warm-up is a
cache hit), warms it up, then lets wrk ask for random chunks of scale 1_1_1 over keep-alive
connections, as a viewer does. wrk runs on the same machine, so it takes
CPU from the server: compare the rows with each other, not with another machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TWISTD = str(Path(sys.executable).parent / "twistd")
DEMO = str(Path(sys.executable).parent / "neurotrale-demo")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def chunk_paths(root: Path) -> list[str]:
    """The URL path of every chunk of scale 1_1_1 of the demo dataset under ``root``."""
    scale = root / "demo-brain" / "1_1_1"
    return sorted(f"/demo-brain/1_1_1/{p.stem}" for p in scale.glob("*.tiff"))


def lua_script(paths: list[str], directory: Path) -> Path:
    """A wrk script asking for a random chunk of ``paths`` with every request."""
    script = directory / "chunks.lua"
    quoted = ",\n  ".join(f'"{p}"' for p in paths)
    script.write_text(
        f"paths = {{\n  {quoted}\n}}\n"
        "request = function()\n"
        '  return wrk.format("GET", paths[math.random(#paths)])\n'
        "end\n"
    )
    return script


def start(
    root: Path, workers: int, cache_mb: int, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log.unlink(missing_ok=True)  # the text of an earlier run would look like a ready server
    env = {**os.environ, "PRECOMPUTED_LOGGING": str(log)}
    process = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "neurotrale",
            "--path",
            str(root),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1:backlog=1024",
            "--workers",
            str(workers),
            "--cache-mb",
            str(cache_mb),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if "NeurotraleSite starting" in text and text.count(" serving on ") >= workers - 1:
            return process, port
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server with {workers} workers did not start")


def wrk(port: int, script: Path, seconds: int, connections: int, threads: int) -> dict[str, str]:
    """Run wrk and return its requests/s, transfer/s and latency figures."""
    result = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stdout}{result.stderr}")
    out = result.stdout

    def find(pattern: str) -> str:
        match = re.search(pattern, out, re.M)
        return match.group(1) if match else "?"

    return {
        "requests/s": find(r"^Requests/sec:\s+([\d.]+)"),
        "MB/s": find(r"^Transfer/sec:\s+([\d.]+\w+)"),
        "p50": find(r"^\s+50%\s+(\S+)"),
        "p99": find(r"^\s+99%\s+(\S+)"),
        "errors": "0"
        if find(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)") == "?"
        else find(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument(
        "--cache-mb",
        type=int,
        nargs="+",
        default=[0, 32],
        help="the server's chunk cache per process (0: every answer decoded again)",
    )
    arguments = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        f"wrk -t{arguments.threads} -c{arguments.connections} -d{arguments.seconds}s, "
        "random chunks of 64x64x32 uint16 (262144 bytes each), no Accept-Encoding\n"
    )
    print(
        "| dataset | cache | workers | requests/s: median (min-max) | transfer | p50 | p99 "
        "| errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    configs = [
        (compression, cache_mb, workers)
        for compression in ("none", "zlib")
        for cache_mb in arguments.cache_mb
        for workers in arguments.workers
    ]
    results: dict[tuple[str, int, int], list[dict[str, str]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="neurotrale-bench-") as temporary:
        base = Path(temporary)
        scripts = {}
        for compression in ("none", "zlib"):
            root = base / compression
            extra = [] if compression == "none" else ["--compression", compression]
            subprocess.run([DEMO, str(root), *extra], check=True, stdout=subprocess.DEVNULL)
            scripts[compression] = lua_script(chunk_paths(root), base / compression)
        # Rounds go over every configuration in turn, so that other load on the machine
        # spreads over all of them instead of spoiling one.
        for _ in range(arguments.repeat):
            for compression, cache_mb, workers in configs:
                log = base / f"server-{compression}-{cache_mb}-{workers}.log"
                process, port = start(base / compression, workers, cache_mb, log)
                script = scripts[compression]
                try:
                    wrk(port, script, 2, arguments.connections, arguments.threads)  # warm up
                    figures = wrk(
                        port, script, arguments.seconds, arguments.connections, arguments.threads
                    )
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=30)
                results[(compression, cache_mb, workers)].append(figures)
    for (compression, cache_mb, workers), runs in results.items():
        runs.sort(key=lambda f: float(f["requests/s"]))
        median = runs[len(runs) // 2]
        spread = f" ({runs[0]['requests/s']}-{runs[-1]['requests/s']})" if len(runs) > 1 else ""
        print(
            f"| {compression} TIFF | {cache_mb} MiB | {workers} | "
            f"{median['requests/s']}{spread} | {median['MB/s']}/s | {median['p50']} | "
            f"{median['p99']} | {median['errors']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
