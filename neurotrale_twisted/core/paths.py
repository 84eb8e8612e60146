"""From a URL path to the data root: validated path segments, and the root held open.

:func:`clean_segments` refuses ``..``, ``.``, backslashes, NUL bytes and dot-names (history,
locks and temporary files live in dot-names and are never served). The segments are then
walked by :class:`rootfs.RootFS` (``DataRoot.fs``) from a handle of the root, one component
at a time and without following links, which keeps every read inside the root; reads
follow a link while it stays inside the root, or anywhere when the operator allowed it
(``--follow-symlinks``); writes never do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from neurotrale_twisted.core.errors import BadRequest, NotFound
from neurotrale_twisted.core.rootfs import RootFS

#: The longest single name most filesystems accept, in bytes.
MAX_NAME_BYTES = 255


def clean_segments(segments: Iterable[str]) -> list[str]:
    """Validate decoded URL path segments and drop the empty ones (``//`` is ``/``).

    Raises :class:`BadRequest` for ``.``, ``..``, backslashes, NUL or over-long names, and
    :class:`NotFound` for dot-names, which are hidden.
    """
    cleaned: list[str] = []
    for segment in segments:
        # A decoded %2f arrives inside one segment: treat it as the separator it spells.
        for part in segment.split("/"):
            if part == "":
                continue
            if part in (".", ".."):
                raise BadRequest(f"path segment {part!r} is not allowed")
            if "\\" in part or "\x00" in part:
                raise BadRequest("path segments may not contain backslashes or NUL bytes")
            if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise BadRequest("a path segment is longer than 255 bytes")
            if part.startswith("."):
                raise NotFound("not found")
            cleaned.append(part)
    return cleaned


class DataRoot:
    """The directory of datasets: its path, and :attr:`fs`, the one way to reach its files."""

    def __init__(self, root: str | os.PathLike[str], follow_symlinks: bool = False) -> None:
        self.root = Path(os.path.realpath(root))
        self.follow_symlinks = follow_symlinks
        #: The root held open: the way every read and write reaches a file under it.
        self.fs = RootFS(self.root, follow_symlinks)

    def name_of(self, segments: Iterable[str]) -> Path:
        """The path that URL ``segments`` name under the root, validated, without any disk access.

        A name only, for the annotation store, which walks from :attr:`fs` again to reach it.
        Raises :class:`BadRequest`/:class:`NotFound` for bad segments (see
        :func:`clean_segments`).
        """
        return self.root.joinpath(*clean_segments(segments))
