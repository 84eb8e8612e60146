"""The one way the tools (``neurotrale-ingest``, ``neurotrale-demo``) write a dataset's files.

Each file is written to a temporary dot-file beside it and renamed over it, so a reader (the
server, a later ``neurotrale-ingest --resume``) sees the old file or the complete new one,
never a torn one; a writer killed part way leaves only its temporary, which
:func:`is_temporary` recognises for a clean-up. The server's own annotation writes go through
the commit protocol of the core instead
(:mod:`neurotrale_twisted.core.annotations.commitlog`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

#: ``.NAME.PID.tmp``: the temporaries :func:`atomic_file` makes (dot-files: never served).
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp\Z")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary that :func:`atomic_file` makes (left by a killed run)."""
    return _TEMPORARY.match(name) is not None


@contextmanager
def atomic_file(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into; renamed over ``path`` on a clean exit.

    With ``durable``, the content is fsynced before the rename, so that after a crash of the
    machine ``path`` holds the old file or the complete new one (the rename itself may be
    lost). On any exception the temporary is removed and the exception goes on.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: object) -> None:
    """Write ``value`` to ``path`` as indented JSON ending in a newline, durably (``info``)."""
    with atomic_file(path) as file:
        file.write((json.dumps(value, indent=2) + "\n").encode())
