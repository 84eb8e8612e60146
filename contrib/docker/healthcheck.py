"""The container's HEALTHCHECK, installed as /apps/healthcheck.py: GET /healthz from the server
on the first endpoint it listens on, read from its command line (process 1's, or the first
``neurotrale`` process's): ``--listen tcp:N`` (``tcp6:``, ``interface=``), ``--listen
ssl:N:...`` (HTTPS; the certificate is not checked: it names the server for its clients, not
127.0.0.1), ``--listen unix:/path``, or ``--port N``; ``tcp:9000`` when none is given, as the
server does. Exits 0 when the answer is 200, 1 otherwise. Standard library only, so it starts
fast and needs nothing of the server's installation."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
from typing import NamedTuple

#: What the server listens on when its command line names no endpoint.
DEFAULT_LISTEN = "tcp:9000"

#: Seconds for the whole check (the HEALTHCHECK's --timeout is 5).
TIMEOUT = 4.0


class Probe(NamedTuple):
    """Where to ask: ``kind`` is ``http``, ``https`` or ``unix``; ``address`` is a host name
    (with ``port``) or a socket path (``port`` 0)."""

    kind: str
    address: str
    port: int


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint description as Twisted reads it: its kind, its positional arguments and its
    keyword arguments, split at unescaped colons (``\\:`` is a colon inside a value)."""
    fields: list[str] = [""]
    escaped = False
    for character in description:
        if escaped:
            fields[-1] += character
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            fields.append("")
        else:
            fields[-1] += character
    kind, *rest = fields
    positional = [field for field in rest if "=" not in field]
    keywords = dict(field.split("=", 1) for field in rest if "=" in field)
    return kind.strip().lower(), positional, keywords


def loopback(interface: str, kind: str) -> str:
    """The address to ask for a socket bound to ``interface``: loopback for a wildcard."""
    if interface in ("", "0.0.0.0"):
        return "::1" if kind == "tcp6" else "127.0.0.1"
    if interface == "::":
        return "::1"
    return interface


def probe_of(description: str) -> Probe | None:
    """How to reach the endpoint ``description``, or None (``systemd:`` and the like: the
    socket came from elsewhere and its address is not on the command line)."""
    kind, positional, keywords = split_description(description)
    if kind == "unix":
        path = keywords.get("address") or (positional[0] if positional else "")
        return Probe("unix", path, 0) if path else None
    if kind in ("tcp", "tcp6", "ssl"):
        port = keywords.get("port") or (positional[0] if positional else "")
        if not port.isdigit():
            return None
        address = loopback(keywords.get("interface", ""), kind)
        return Probe("https" if kind == "ssl" else "http", address, int(port))
    return None


def listen_descriptions(arguments: list[str]) -> list[str]:
    """The endpoints the server was told to listen on, in order: each ``--listen`` (or
    ``--listen=``), then ``--port N`` as ``tcp:N`` (as the server adds it); the default when
    none is given."""
    listens: list[str] = []
    ports: list[str] = []
    for index, argument in enumerate(arguments):
        following = arguments[index + 1] if index + 1 < len(arguments) else ""
        if argument == "--listen":
            listens.append(following)
        elif argument.startswith("--listen="):
            listens.append(argument.split("=", 1)[1])
        elif argument == "--port":
            ports.append(f"tcp:{following}")
        elif argument.startswith("--port="):
            ports.append(f"tcp:{argument.split('=', 1)[1]}")
    return listens + ports or [DEFAULT_LISTEN]


def read_arguments(cmdline_path: str) -> list[str] | None:
    """The NUL-separated arguments in ``cmdline_path``, or None when it cannot be read."""
    try:
        with open(cmdline_path, "rb") as cmdline:
            return cmdline.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None


def server_arguments(proc: str = "/proc") -> list[str]:
    """The server's command line: process 1's when it runs ``neurotrale`` (the entry point
    execs the server), else that of the first process that does (under ``--init``), else
    none."""
    pids = sorted(int(entry) for entry in os.listdir(proc) if entry.isdigit())
    for pid in sorted(pids, key=lambda pid: pid != 1):
        arguments = read_arguments(f"{proc}/{pid}/cmdline")
        if arguments is not None and "neurotrale" in arguments:
            return arguments
    return []


def probe(arguments: list[str]) -> Probe:
    """The first endpoint of the server's that this check can reach (tcp:9000 when none)."""
    for description in listen_descriptions(arguments):
        found = probe_of(description)
        if found is not None:
            return found
    fallback = probe_of(DEFAULT_LISTEN)
    assert fallback is not None
    return fallback


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX domain socket at ``path``."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        """Connect to the socket file instead of a host and port."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connection(target: Probe) -> http.client.HTTPConnection:
    """A connection to ``target``, not yet opened."""
    if target.kind == "unix":
        return UnixHTTPConnection(target.address, TIMEOUT)
    if target.kind == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(
            target.address, target.port, timeout=TIMEOUT, context=context
        )
    return http.client.HTTPConnection(target.address, target.port, timeout=TIMEOUT)


def healthy(target: Probe) -> bool:
    """Whether ``GET /healthz`` at ``target`` answers 200 (says why not on stderr)."""
    ask = connection(target)
    try:
        ask.request("GET", "/healthz")
        status = ask.getresponse().status
    except (OSError, http.client.HTTPException) as error:
        print(f"unhealthy: {target.kind} {target.address} {target.port}: {error}", file=sys.stderr)
        return False
    finally:
        ask.close()
    if status != 200:
        print(f"unhealthy: /healthz answered {status}", file=sys.stderr)
    return status == 200


def main(cmdline_path: str | None = None) -> int:
    """Ask the server's /healthz (the server's command line is in ``cmdline_path``, else found
    in /proc); 0 when healthy, 1 otherwise."""
    found = server_arguments() if cmdline_path is None else read_arguments(cmdline_path)
    return 0 if healthy(probe(found or [])) else 1


if __name__ == "__main__":
    sys.exit(main())
