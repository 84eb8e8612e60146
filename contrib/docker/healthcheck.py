"""The container's HEALTHCHECK, installed as /apps/healthcheck.py: GET /healthz on the port
the server listens on (read from the command line of process 1, ``--listen tcp:N``; 9000
when none is found). Exits 0 when the answer is 200, 1 otherwise."""

import re
import sys
import urllib.request


def port(cmdline_path: str = "/proc/1/cmdline") -> int:
    """The first TCP port on the server's command line, else 9000."""
    try:
        with open(cmdline_path, "rb") as cmdline:
            arguments = cmdline.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return 9000
    for argument in arguments:
        match = re.match(r"^(?:--listen=)?tcp6?:(\d+)", argument)
        if match:
            return int(match.group(1))
    return 9000


def main() -> int:
    """Ask /healthz; 0 when healthy."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port()}/healthz", timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
