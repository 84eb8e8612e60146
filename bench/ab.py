"""A/B of two source trees of the server on the warm chunk set, with nginx in the same run.

For each step of the hot-path work: ``wrk -t1 -c32`` on a view's 32 chunks (they fit the
cache), nginx (sendfile) then A then B, ``--runs`` rounds, each figure also as a ratio to
nginx's figure of the same round (this machine is shared: absolute figures drift), and the
CPU time each server's processes spent per request (less sensitive to other load).

    python bench/ab.py --a /work/main --b . [--workers 1] [--browser] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chunks_bench import (  # noqa: E402
    BROWSER,
    free_port,
    make_volume,
    nginx_config,
    run_wrk,
    wait_for,
    write_dataset,
)
from views_bench import tree_cpu_seconds, view_blocks, wait_for_workers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="source tree A (put first on PYTHONPATH)")
    parser.add_argument("--b", required=True, help="source tree B")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="Accept-Encoding as browsers")
    parser.add_argument("--cold", action="store_true", help="cycle all chunks, not one view")
    args = parser.parse_args()
    twistd = str(Path(sys.executable).parent / "twistd")
    headers = {"Accept-Encoding": BROWSER} if args.browser else {}
    with tempfile.TemporaryDirectory(prefix="neurotrale-ab-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)
        data = tmp / "data"
        paths = write_dataset(data, "raw", make_volume((512, 512, 256)), 64, "none")
        urls = tmp / "urls"
        urls.write_text("\n".join(paths if args.cold else view_blocks(paths, (8, 8, 4))[0]))
        ports = {"nginx": free_port(), "A": free_port(), "B": free_port()}
        conf = nginx_config(data, tmp, ports["nginx"], free_port(), args.workers)
        processes = [subprocess.Popen(["nginx", "-c", str(conf)])]
        for label, tree in (("A", args.a), ("B", args.b)):
            log = tmp / f"{label}.log"
            processes.append(
                subprocess.Popen(
                    [twistd, "-n", "--pidfile=", f"--logfile={log}", "neurotrale",
                     "--path", str(data),
                     "--listen", f"tcp:{ports[label]}:interface=127.0.0.1:backlog=1024",
                     "--workers", str(args.workers)],
                    env={**os.environ, "PYTHONPATH": str(Path(tree).resolve())},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        try:
            for label, port in ports.items():
                wait_for(f"http://127.0.0.1:{port}{paths[0]}")
                if label != "nginx":
                    wait_for_workers(tmp / f"{label}.log", args.workers)
            ratios: dict[str, list[float]] = {"A": [], "B": []}
            cpu: dict[str, list[float]] = {"nginx": [], "A": [], "B": []}
            pids = dict(zip(ports, (p.pid for p in processes), strict=True))
            for round_ in range(args.runs):
                figures = {}
                for label, port in ports.items():
                    base = f"http://127.0.0.1:{port}"
                    run_wrk(base, urls, 32, 1, headers, threads=1)
                    before = tree_cpu_seconds([pids[label]])
                    result = run_wrk(base, urls, 32, args.duration, headers, threads=1)
                    spent = tree_cpu_seconds([pids[label]]) - before
                    figures[label] = result.rps
                    cpu[label].append(spent / (result.rps * args.duration) * 1e6)
                for label in ratios:
                    ratios[label].append(figures[label] / figures["nginx"])
                print(
                    f"round {round_ + 1}: nginx {figures['nginx']:.0f}, "
                    f"A {figures['A']:.0f} ({ratios['A'][-1]:.2f}), "
                    f"B {figures['B']:.0f} ({ratios['B'][-1]:.2f}) req/s; CPU per request: "
                    + ", ".join(f"{k} {v[-1]:.0f} us" for k, v in cpu.items()),
                    flush=True,
                )
            a, b = statistics.median(ratios["A"]), statistics.median(ratios["B"])
            print(f"median ratio to nginx: A {a:.2f}, B {b:.2f}; B/A {b / a:.2f}")
            ca, cb = statistics.median(cpu["A"]), statistics.median(cpu["B"])
            print(f"median CPU per request: A {ca:.0f} us, B {cb:.0f} us; B/A {cb / ca:.2f}")
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=20)


if __name__ == "__main__":
    main()
