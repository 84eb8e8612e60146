"""From a URL path to the data root: validated path segments, and the root held open.

:func:`clean_segments` refuses ``..``, ``.``, backslashes, NUL bytes and dot-names (history,
locks and temporary files live in dot-names and are never served). The segments are then
walked by :class:`rootfs.RootFS` (``DataRoot.fs``) from a handle of the root, one component
at a time and without following links, which keeps every read inside the root; reads may
follow a link only when the operator allowed it (``--follow-symlinks``); writes never do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import BadRequest, Forbidden, NotFound
from .rootfs import RootFS

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


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` (already resolved) is ``root`` or lies below it."""
    path_s, root_s = os.fspath(path), os.fspath(root)
    return path_s == root_s or path_s.startswith(root_s.rstrip(os.sep) + os.sep)


class DataRoot:
    """The directory of datasets: its path, and :attr:`fs`, the one way to reach its files."""

    def __init__(self, root: str | os.PathLike[str], follow_symlinks: bool = False) -> None:
        self.root = Path(os.path.realpath(root))
        self.follow_symlinks = follow_symlinks
        #: The root held open: the way every read and write reaches a file under it.
        self.fs = RootFS(self.root, follow_symlinks)

    # for_reading, for_writing, check_readable and check_writable remain only for
    # annotations.py (and web.py's annotation route), until they go through ``fs`` (the commit
    # branch): then remove them with is_within. Nothing else may use them.

    def for_reading(self, segments: Iterable[str]) -> Path:
        """The path that the URL segments name, checked for reading (annotations only).

        The path may not exist. Raises :class:`BadRequest`/:class:`NotFound` for bad segments
        and :class:`NotFound` when a symbolic link leads out of the root and following such
        links was not allowed.
        """
        path = self.root.joinpath(*clean_segments(segments))
        self.check_readable(path)
        return path

    def for_writing(self, segments: Iterable[str]) -> Path:
        """The path that the URL segments name, checked for writing.

        Writes never follow a link out of the root, whatever ``follow_symlinks`` says.
        Raises :class:`Forbidden` when they would.
        """
        path = self.root.joinpath(*clean_segments(segments))
        self.check_writable(path)
        return path

    def check_writable(self, path: Path) -> None:
        """Raise :class:`Forbidden` unless ``path`` resolves inside the root.

        Used for every directory and file a write touches, including ones it creates.
        """
        if not is_within(os.path.realpath(path), self.root):
            raise Forbidden("writes may not leave the data root")

    def check_readable(self, path: Path) -> None:
        """Raise :class:`NotFound` if ``path`` resolves out of the root and that is not allowed.

        Annotations only (see above).
        """
        if not (self.follow_symlinks or is_within(os.path.realpath(path), self.root)):
            raise NotFound("not found")
