"""The health check behind ``GET /healthz``: can this process read its data root?

Pure Python, no Twisted: the route runs :func:`check_data_root` on the thread pool with a
time limit, since a hung network file system blocks the call rather than failing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from neurotrale_twisted.core.rootfs import RootFS


@dataclass(frozen=True)
class Health:
    """The answer of a health check: healthy or not, and why."""

    ok: bool
    detail: str

    def document(self) -> dict[str, object]:
        """The JSON body of ``GET /healthz``."""
        return {"status": "ok" if self.ok else "unavailable", "detail": self.detail}


def check_data_root(fs: RootFS) -> Health:
    """Healthy when the held data root can be listed and entered (with its mode of now) and
    is still the directory at its path.

    The server serves the directory it opened at start-up; one removed, moved away or
    replaced since is served no more by the path the operator configured, which a restart
    mends.
    """
    try:
        with fs.root() as top:
            next(top.entries(), None)
        readable = fs.may_read()
        current = fs.still_at_path()
    except OSError as error:
        return Health(False, f"the data root cannot be read: {error.strerror or error}")
    if not readable:
        return Health(False, "the data root may no longer be listed or entered by the server")
    if not current:
        return Health(False, "the data root was removed, moved or replaced since start-up")
    return Health(True, "the data root is readable")
