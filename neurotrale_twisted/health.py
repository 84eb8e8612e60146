"""The health check behind ``GET /healthz``: can this process read its data root?

Pure Python, no Twisted: the route runs :func:`check_data_root` on the thread pool with a
time limit, since a hung network file system blocks the call rather than failing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Health:
    """The answer of a health check: healthy or not, and why."""

    ok: bool
    detail: str

    def document(self) -> dict[str, object]:
        """The JSON body of ``GET /healthz``."""
        return {"status": "ok" if self.ok else "unavailable", "detail": self.detail}


def check_data_root(root: Path) -> Health:
    """Healthy when ``root`` is a directory this process can list."""
    try:
        with os.scandir(root) as entries:
            next(entries, None)
    except OSError as error:
        return Health(False, f"the data root cannot be read: {error.strerror or error}")
    return Health(True, "the data root is readable")
