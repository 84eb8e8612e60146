"""This server's chunk route against bare ``twisted.web`` answering the same bytes from memory.

Issue 13 asks for a chunk hot path "close to bare twisted.web's" cost per request. Both run as
one process; wrk (``-t1 -c32``) cycles a view's 32 chunk URLs (the cache holds them: warm),
identity, 3 rounds, both in each round; the CPU time each process spent per request is
read from ``/proc`` (steadier than requests per second on a shared machine). The bare server
(``--serve``) is a ``twisted.web`` leaf resource whose ``render_GET`` returns one 512 KiB
``bytes`` for every path: no routing, no file, no thread, no log.

    python bench/bare_twisted.py [--runs 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chunks_bench import free_port, make_volume, run_wrk, wait_for, write_dataset  # noqa: E402
from views_bench import tree_cpu_seconds, view_blocks, wait_for_workers  # noqa: E402

BODY_BYTES = 64**3 * 2


def serve(port: int) -> None:
    """The bare server: every GET answers the same 512 KiB from memory."""
    from twisted.internet import reactor
    from twisted.web import resource, server

    body = bytes(BODY_BYTES)

    class Bare(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> bytes:
            request.setHeader(b"content-type", b"application/octet-stream")
            return body

    reactor.listenTCP(port, server.Site(Bare()), backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    twistd = str(Path(sys.executable).parent / "twistd")
    with tempfile.TemporaryDirectory(prefix="neurotrale-bare-") as name:
        tmp = Path(name)
        data = tmp / "data"
        paths = write_dataset(data, "raw", make_volume((512, 512, 256)), 64, "none")
        urls = tmp / "urls"
        urls.write_text("\n".join(view_blocks(paths, (8, 8, 4))[0]))
        ports = {"bare": free_port(), "neurotrale": free_port()}
        log = tmp / "neurotrale.log"
        processes = {
            "bare": subprocess.Popen([sys.executable, __file__, "--serve", str(ports["bare"])]),
            "neurotrale": subprocess.Popen(
                [twistd, "-n", "--pidfile=", f"--logfile={log}", "neurotrale",
                 "--path", str(data),
                 "--listen", f"tcp:{ports['neurotrale']}:interface=127.0.0.1:backlog=1024",
                 "--workers", "1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        }  # fmt: skip
        try:
            for port in ports.values():
                wait_for(f"http://127.0.0.1:{port}{paths[0]}")
            wait_for_workers(log, 1)
            rps: dict[str, list[float]] = {label: [] for label in ports}
            cpu: dict[str, list[float]] = {label: [] for label in ports}
            for round_ in range(args.runs):
                for label, port in ports.items():
                    base = f"http://127.0.0.1:{port}"
                    run_wrk(base, urls, 32, 1, {}, threads=1)
                    before = tree_cpu_seconds([processes[label].pid])
                    result = run_wrk(base, urls, 32, args.duration, {}, threads=1)
                    spent = tree_cpu_seconds([processes[label].pid]) - before
                    rps[label].append(result.rps)
                    cpu[label].append(spent / (result.rps * args.duration) * 1e6)
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{k} {rps[k][-1]:.0f} req/s {cpu[k][-1]:.0f} us" for k in ports),
                    flush=True,
                )
            bare, ours = (statistics.median(cpu[k]) for k in ("bare", "neurotrale"))
            fast, slow = (statistics.median(rps[k]) for k in ("bare", "neurotrale"))
            print(
                f"median: bare twisted.web {fast:.0f} req/s, {bare:.0f} us CPU per request; "
                f"neurotrale {slow:.0f} req/s ({slow / fast:.2f}x), {ours:.0f} us "
                f"({ours / bare:.2f}x bare's CPU per request)"
            )
        finally:
            for process in processes.values():
                process.send_signal(signal.SIGTERM)
            for process in processes.values():
                process.wait(timeout=20)


if __name__ == "__main__":
    main()
