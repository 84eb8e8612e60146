"""The ``neurotrale-ingest`` command: its options, its messages, and its exit status: 0 done,
1 failed while writing, 2 bad input (nothing written), 130 interrupted."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures.process import BrokenProcessPool

from neurotrale_twisted import project_version
from neurotrale_twisted.core.cpus import usable_cpus
from neurotrale_twisted.tools.arguments import ArgumentParser
from neurotrale_twisted.tools.ingest.chunkfiles import COMPRESSIONS
from neurotrale_twisted.tools.ingest.run import ingest
from neurotrale_twisted.tools.ingest.settings import prepare
from neurotrale_twisted.tools.ingest.source import BadInput

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``neurotrale-ingest``."""
    parser = ArgumentParser(
        prog="neurotrale-ingest",
        description="Turn a stack of TIFF planes into a precomputed-tif dataset for "
        "`twistd neurotrale`.",
        epilog="Example: neurotrale-ingest --source 'planes/*.tif' --dest /data/brain1, then "
        "twistd -n neurotrale --path /data and open precomputed://http://HOST:9000/brain1",
    )
    parser.add_argument(
        "--source",
        required=True,
        nargs="+",
        metavar="GLOB",
        help="the planes: glob patterns (quote them), files or directories; read in natural "
        "sorted order. 2-D planes, or 3-D stacks (z, y, x) of planes",
    )
    parser.add_argument(
        "--dest", required=True, metavar="DIR", help="the dataset directory to write"
    )
    parser.add_argument(
        "--levels",
        type=int,
        metavar="N",
        help="number of scales (default: halve while every dimension spans a chunk)",
    )
    parser.add_argument(
        "--chunk-size", default="64,64,64", metavar="X,Y,Z", help="chunk size (default 64,64,64)"
    )
    parser.add_argument(
        "--voxel-size",
        default="1.8,1.8,2.0",
        metavar="X,Y,Z",
        help="voxel size in micrometres (default 1.8,1.8,2.0)",
    )
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="none",
        help="TIFF compression of the chunk files (default none)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        default=usable_cpus(),
        help="processes writing chunks (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--segmentation",
        action="store_true",
        help="the planes hold labels: downsample by the most frequent label, not the mean",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted ingest: write only missing or incomplete chunks",
    )
    again.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --dest, replacing its info and chunk files",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``neurotrale-ingest``; return the exit status (2 for bad input, nothing written)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed why (or the help)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        settings = prepare(args)
    except BadInput as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = ingest(settings)
    except KeyboardInterrupt:
        print(
            f"{parser.prog}: interrupted; run the same command with --resume to finish",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (OSError, BrokenProcessPool) as e:
        print(
            f"{parser.prog}: error: {e}\n(fix it, then run the same command with --resume)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    x, y, z = settings.stack.size
    print(
        f"wrote {report.dataset}: {x}x{y}x{z} {settings.stack.dtype} in {report.levels} "
        f"scales, {report.written} chunk files written, {report.skipped} kept"
    )
    print(f"serve it with: twistd -n neurotrale --path {report.dataset.resolve().parent}")
    return EXIT_OK
