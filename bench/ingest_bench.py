"""Measure ``neurotrale-ingest``: speed (MB/s of source planes) and peak memory.

``python bench/ingest_bench.py [--size 1024 --depth 256 --jobs 2 --compression none]`` writes a
stack of uint16 planes to a temporary directory (not timed), runs ``neurotrale-ingest`` on it
as a subprocess, as a user would, and prints:

- the wall time and the source bytes per second;
- the peak resident memory of the process tree (the ingest and its writer processes, summed,
  sampled every 50 ms from ``/proc``), and ``getrusage``'s largest single process
  (``RUSAGE_SELF`` for this script, ``RUSAGE_CHILDREN`` for the ingest and its workers).

The default stack (1024 x 1024 x 256, 512 MiB) is four chunk rows deep, so the ingest has to
stream it through its one-chunk-row buffers rather than hold it.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tifffile

MIB = 1024 * 1024


def write_stack(directory: Path, size: int, depth: int, seed: int = 1) -> int:
    """Write ``depth`` planes of ``size`` x ``size`` uint16, like a dim microscope; return bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    background = (300 + 200 * np.sin(xx / 97.0) * np.cos(yy / 131.0)).astype(np.float32)
    for z in range(depth):
        noise = rng.normal(0, 40, (size, size)).astype(np.float32)
        plane = np.clip(background + noise + 20 * np.sin(z / 11.0), 0, 65535).astype(np.uint16)
        tifffile.imwrite(directory / f"plane_{z:05d}.tif", plane)
    return size * size * depth * 2


def tree_rss(root: int) -> int:
    """The summed resident memory, in bytes, of process ``root`` and all its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            continue  # it has just exited
    return total


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="plane width and height")
    parser.add_argument("--depth", type=int, default=256, help="number of planes")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--compression", default="none", choices=["none", "zlib", "zstd"])
    parser.add_argument("--chunk-size", default="64,64,64")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=args.workdir))
    try:
        planes = work / "planes"
        planes.mkdir()
        source_bytes = write_stack(planes, args.size, args.depth)
        command = [
            sys.executable,
            "-m",
            "neurotrale_twisted.tools.ingest",
            "--source",
            str(planes),
            "--dest",
            str(work / "data" / "bench"),
            "--jobs",
            str(args.jobs),
            "--compression",
            args.compression,
            "--chunk-size",
            args.chunk_size,
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss(process.pid))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = process.communicate()
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
        if process.returncode != 0:
            print(err.decode(), file=sys.stderr)
            return process.returncode
        written = sum(p.stat().st_size for p in (work / "data").rglob("*") if p.is_file())
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        itself = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(out.decode().strip())
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, numpy {np.__version__}, tifffile {tifffile.__version__}"
        )
        print(
            f"stack: {args.size}x{args.size}x{args.depth} uint16 = {source_bytes / MIB:.0f} MiB; "
            f"chunks {args.chunk_size}, compression {args.compression}, --jobs {args.jobs}"
        )
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"wall time: {elapsed:.2f} s (load average after: {load})")
        print(f"speed: {source_bytes / MIB / elapsed:.0f} MiB/s of source planes")
        print(f"written: {written / MIB:.0f} MiB (all scales)")
        print(f"peak RSS, ingest + writer processes summed: {peak / MIB:.0f} MiB")
        print(
            f"peak RSS (getrusage): largest child {children:.0f} MiB, this script {itself:.0f} MiB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
