"""The ``twistd neurotrale`` command line: :class:`Options`, shared by the parent and its workers.

Shaped like Twisted's own ``twistd web``: repeatable ``--listen`` endpoint descriptions with a
default filled in by ``postOptions``. A worker process parses the parent's own arguments with
this same class (:mod:`neurotrale_twisted.process.worker`), so its checks and defaults hold in
every process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.python import usage

from neurotrale_twisted import project_version
from neurotrale_twisted.core.cpus import usable_cpus

DEFAULT_LISTEN = "tcp:9000"
DEFAULT_ROOT = "/data"
#: The largest TCP port number.
MAX_PORT = 65535


def default_threads() -> int:
    """Threads for decoding and writing: enough to keep every usable CPU and the disks busy."""
    return min(32, usable_cpus() + 4)


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A coercion to a whole number of at least ``minimum`` (and at most ``maximum``),
    saying so when it is not."""
    if maximum is None:
        wanted = f"must be a whole number of at least {minimum}"
    else:
        wanted = f"must be a whole number from {minimum} to {maximum}"

    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(wanted) from None
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(wanted)
        return number

    return coerce


_positive = _at_least(1)


class CannotServe(usage.UsageError):
    """A file the options name cannot be used (the data root is missing, not a directory or
    unreadable; the htpasswd file is unreadable): not a mistake in how the command was
    written, so the command line exits with status 1."""


class _NamedParameter(usage.CoerceParameter):
    """A parameter whose refusal names the option and the value: ``--workers '0': must be
    a whole number of at least 1`` (Twisted's names neither)."""

    def dispatch(self, parameterName: str, value: str | None) -> None:
        """Coerce ``value`` and store it, or refuse it naming the option."""
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName} {value!r}: {e}") from None


#: The environment variables the server reads, for ``--help``.
ENVIRONMENT = (
    ("PRECOMPUTED_PATH", "the data root when --path is not given (else /data)"),
    ("PRECOMPUTED_LOGGING", "a file the log is written to as well"),
)


class Options(usage.Options):
    """Options of ``twistd neurotrale``."""

    synopsis = "[options]"
    longdesc = (
        "Serve Neuroglancer precomputed image chunks decoded from TIFF files, and the "
        "NeuroTrALE annotation files, from a directory of datasets."
    )
    optParameters: list[list[Any]] = [
        ["path", "p", None, "The data root [default: $PRECOMPUTED_PATH, else /data]."],
        [
            "port",
            None,
            None,
            "Shorthand for --listen tcp:PORT [default: none].",
            _at_least(1, MAX_PORT),
        ],
        [
            "workers",
            "w",
            None,
            "Processes serving requests; 1: one process [default: the CPUs this process may "
            f"use, {usable_cpus()} here].",
            _positive,
        ],
        [
            "threads",
            None,
            None,
            "Threads per process for decoding and writing files [default: usable CPUs + 4, "
            f"at most 32: {default_threads()} here].",
            _positive,
        ],
        ["keep-versions", None, 20, "Earlier versions kept per annotation file.", _at_least(0)],
        ["max-body", None, 64, "Largest request body accepted, in MiB.", _positive],
        ["cache-mb", None, 32, "Memory for cached chunk answers, MiB per process.", _at_least(0)],
        ["max-header-kb", None, 16, "Largest request line plus headers, in KiB.", _positive],
        ["request-timeout", None, 60, "Seconds a client has to send a whole request.", _positive],
        ["idle-timeout", None, 60, "Seconds an idle keep-alive connection stays open.", _positive],
        [
            "header-timeout",
            None,
            10,
            "Seconds a connection has to send a request's line and headers.",
            _positive,
        ],
        [
            "max-connections",
            None,
            None,
            "Connections open at once per process; more are closed at once [default: the "
            "open-file limit less a reserve for files, at most 16384].",
            _positive,
        ],
        [
            "htpasswd",
            None,
            None,
            "Apache htpasswd file (bcrypt): writes need its credentials [default: none, "
            "anyone may write].",
        ],
    ]
    optFlags = [
        ["follow-symlinks", None, "Let reads follow symbolic links out of the data root [off]."],
        ["read-only", None, "Refuse every write (403); reads are unaffected [off]."],
        ["auth-reads", None, "With --htpasswd, reads need credentials too [off]."],
        [
            "trust-proxy",
            None,
            "Log the client address a reverse proxy sends in X-Forwarded-For [off].",
        ],
    ]
    compData = usage.Completions(optActions={"path": usage.CompleteDirs()})

    def __init__(self) -> None:
        super().__init__()
        #: The command-line arguments parsed, for worker processes to parse again (None
        #: until :meth:`parseOptions`).
        self.arguments: list[str] | None = None
        self["listen"] = []
        self["cors-origin"] = []
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedParameter(self, handler.coerce)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse ``options`` (else this process's command line), and keep them: each worker
        process parses the same arguments with this same class."""
        arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(arguments)
        self.arguments = arguments

    def opt_version(self) -> None:
        """Print the version of neurotrale-twisted and exit."""
        print(f"neurotrale-twisted {project_version()}")
        sys.exit(0)

    def getUsage(self, width: int | None = None) -> str:
        """Twisted's option list, then the environment variables the server reads."""
        environment = "".join(f"  {name:<20} {what}\n" for name, what in ENVIRONMENT)
        return f"{super().getUsage(width)}\nEnvironment:\n{environment}"

    def opt_listen(self, description: str) -> None:
        """Listen on an endpoint: tcp:9000, tcp:9000:interface=127.0.0.1, unix:/run/x.sock,
        ssl:9443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0 (repeatable)
        [default: tcp:9000, every interface]."""
        self["listen"].append(description)

    def opt_cors_origin(self, origin: str) -> None:
        """An origin allowed to read answers from a browser (repeatable) [default: any, '*']."""
        self["cors-origin"].append(origin)

    def parseArgs(self, *args: str) -> None:
        """Refuse a word that is no option, naming it (Twisted's says "Wrong number of
        arguments")."""
        if args:
            raise usage.UsageError(
                f"unexpected argument {args[0]!r}: options begin with -- (a data root is "
                "--path DIR)"
            )

    def postOptions(self) -> None:
        """Fill in the defaults and refuse a data root that cannot be served."""
        if self["path"] == "":
            raise usage.UsageError("--path '': must name a directory")
        path = self["path"] or os.environ.get("PRECOMPUTED_PATH") or DEFAULT_ROOT
        if self["path"]:
            source = " (--path)"
        elif os.environ.get("PRECOMPUTED_PATH"):
            source = " ($PRECOMPUTED_PATH)"
        else:
            source = " (the default: give --path DIR)"
        if not os.path.isdir(path):
            raise CannotServe(f"the data root {path!r} is not a directory{source}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise CannotServe(f"the data root {path!r} is not readable{source}")
        self["path"] = path
        if self["port"] is not None:
            self["listen"].append(f"tcp:{self['port']}")
        if not self["listen"]:
            self["listen"].append(DEFAULT_LISTEN)
        if self["htpasswd"] is not None and not os.access(self["htpasswd"], os.R_OK):
            raise CannotServe(f"cannot read the htpasswd file {self['htpasswd']!r} (--htpasswd)")
        if self["auth-reads"] and self["htpasswd"] is None:
            raise usage.UsageError("--auth-reads needs --htpasswd")
        if self["workers"] is None:
            self["workers"] = usable_cpus()
        if self["threads"] is None:
            self["threads"] = default_threads()
