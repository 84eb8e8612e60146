"""PATCH latency (p50, p99) and throughput with one and two hosts over one shared directory.

Not a test: run it by hand on a quiet machine, and copy the table it prints into
docs/shared-filesystems.md ("What it costs"). Needs what tests/test_multihost.py needs
(root or /dev/fuse access, bindfs, haproxy):

    python bench/patch_bench.py --baseline d2e93ac   # full run; d2e93ac: the lock-based code
    python bench/patch_bench.py --quick              # a few seconds per row: does it work?
    python bench/patch_bench.py --baseline main --code commit   # two revisions, before a merge

Each row starts fresh servers (``--workers`` processes per host) behind haproxy
(contrib/multihost/haproxy.cfg, round-robin) on a fresh dataset whose annotation files each
hold ``--records`` records, then ``--clients`` threads, each on its own keep-alive connection
to haproxy, PATCH existing records (so the files keep their size) of ``--files`` files for
``--seconds`` after a warm-up, timing every answer. Rows:

* ``1 host, <rev> (lock-based)``: the code of git revision ``--baseline`` (exported from this
  repository with ``git archive``), one host on one bindfs mount: the cost before;
* ``1 host``, ``2 hosts``: this tree's code (or revision ``--code``) on one bindfs mount, or
  on two mounts of one directory (two "hosts" whose locks are not shared, as in
  tests/test_multihost.py);
* ``1 host, local directory``: this tree's code without FUSE, to tell bindfs's own cost
  (a single-threaded FUSE daemon per mount) from the server's.

The clients run on the same machine and take CPU from the servers: compare rows with each
other, not with another machine. Every row counts non-2xx answers; a row with errors is not
a fair figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from multihost_setup import (
    BLOCK,
    BLOCK_URL,
    DATASET,
    REPO,
    Balancer,
    Host,
    SharedDirectory,
    missing_tools,
    write_dataset,
)


@dataclass
class Row:
    """One configuration's figures."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def line(self) -> str:
        rate = len(self.latencies) / self.seconds if self.seconds else 0.0
        errors = ", ".join(f"{n} x {what}" for what, n in sorted(self.errors.items())) or "0"
        return (
            f"| {self.name} | {len(self.latencies)} | {errors} | {rate:.1f} | "
            f"{self.percentile(0.50):.1f} | {self.percentile(0.99):.1f} |"
        )


def fill(root: Path, files: int, records: int) -> list[str]:
    """The dataset and its annotation files, ``records`` points each; their names."""
    write_dataset(root)
    names = [f"bench-{i}.json" for i in range(files)]
    block = root / DATASET / "annotations" / BLOCK
    for name in names:
        points = [
            {"id": f"r{k}", "type": "point", "point": [k, 1, 2], "anntype": "neuron"}
            for k in range(records)
        ]
        (block / name).write_text(json.dumps(points, separators=(",", ":")))
    return names


def load(url: str, names: list[str], records: int, args: argparse.Namespace, row: Row) -> None:
    """``--clients`` threads PATCHing for ``--warmup`` + ``--seconds``; times go into ``row``."""
    host, port = url.removeprefix("http://").split(":")
    lock = threading.Lock()
    start = time.monotonic()
    measure_from = start + args.warmup
    stop_at = measure_from + args.seconds

    def client(number: int) -> None:
        rng = random.Random(number)
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        counter = 0
        while (now := time.monotonic()) < stop_at:
            counter += 1
            name = rng.choice(names)
            rid = f"r{rng.randrange(records)}"
            body = json.dumps(
                {"id": rid, "type": "point", "point": [number, counter, 3], "anntype": "glia"}
            ).encode()
            sent = time.monotonic()
            try:
                connection.request("PATCH", f"{BLOCK_URL}/{name}?id={rid}", body=body)
                answer = connection.getresponse()
                answer.read()
                outcome = "" if answer.status == 200 else str(answer.status)
            except (OSError, http.client.HTTPException) as e:
                outcome = type(e).__name__
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=60)
            took = time.monotonic() - sent
            if now >= measure_from:
                with lock:
                    if not outcome:
                        row.latencies.append(took)
                    else:
                        row.errors[outcome] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row.seconds = args.seconds


def export(revision: str, into: Path) -> Path:
    """The server's code at git ``revision``, unpacked under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "neurotrale_twisted", "twisted"],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_row(
    name: str, base: Path, args: argparse.Namespace, *, code: Path, hosts: int, fuse: bool
) -> Row:
    """Set up one configuration under ``base``, load it, tear it down."""
    base.mkdir()
    row = Row(name)
    env = {"PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    extra = ("--keep-versions", str(args.keep_versions))
    shared = SharedDirectory(base) if fuse else None
    servers: list[Host] = []
    proxy = None
    try:
        roots = shared.mounts[:hosts] if shared else [base / "local"] * hosts
        source = shared.source if shared else roots[0]
        source.mkdir(exist_ok=True)
        names = fill(source, args.files, args.records)
        for i, root in enumerate(roots):
            servers.append(
                Host(f"host-{'ab'[i]}", root, base, *extra, workers=args.workers, env=env)
            )
        proxy = Balancer(servers, base / "haproxy.log")
        load(proxy.url, names, args.records, args, row)
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()
        if shared is not None:
            shared.unmount()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per row, 4 clients")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="processes per host")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--records", type=int, default=500, help="records per file")
    parser.add_argument("--keep-versions", type=int, default=20)
    parser.add_argument(
        "--baseline", metavar="REV", help="also measure the code of this git revision, 1 host"
    )
    parser.add_argument(
        "--code", metavar="REV", help="measure this git revision instead of the working tree"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.clients, args.records = 2.0, 0.5, 4, 200
    missing = missing_tools()
    if missing:
        sys.exit(f"cannot run: {missing}")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="patch-bench-") as tmp:
        work = Path(tmp)
        plan: list[tuple[str, Path, int, bool]] = []
        if args.baseline:
            old = export(args.baseline, work / "baseline-code")
            plan.append((f"1 host, {args.baseline} (lock-based)", old, 1, True))
        code, label = REPO, ""
        if args.code:
            code, label = export(args.code, work / "code"), f", {args.code}"
        plan += [
            (f"1 host{label}", code, 1, True),
            (f"2 hosts{label}", code, 2, True),
            (f"1 host, local directory{label}", code, 1, False),
        ]
        for number, (name, code, hosts, fuse) in enumerate(plan):
            print(f"running: {name}", file=sys.stderr, flush=True)
            row = run_row(name, work / f"row-{number}", args, code=code, hosts=hosts, fuse=fuse)
            rows.append(row)

    print(
        f"\nPATCH of one record in a {args.records}-record file ({args.files} files), "
        f"{args.clients} clients, {args.workers} workers per host, {args.seconds:g} s per row; "
        f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print("| configuration | PATCHes | errors | PATCH/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    main()
