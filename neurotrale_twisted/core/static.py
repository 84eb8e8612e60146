"""What the static route serves, found through :mod:`rootfs` off the reactor thread.

A URL path names either a regular file, opened here and then streamed from that open file by
the web layer, or a directory, whose listing is read here whole. Nothing is looked up by path
afterwards, so what is served is what was checked: a directory swapped for a link meanwhile
changes nothing, and a FIFO, socket or device is :class:`NotFound` without ever blocking.
Pure Python, no Twisted.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from neurotrale_twisted.core.errors import Forbidden
from neurotrale_twisted.core.rootfs import Directory, Follow, OpenedFile, RootFS


@dataclass(frozen=True)
class ListedName:
    """One name of a directory listing: a subdirectory, or a regular file of ``size`` bytes."""

    name: str
    is_dir: bool
    size: int


#: The most names a listing shows (the first ones, sorted): a directory of a million names
#: would otherwise cost a page of a hundred megabytes, made anew for every request.
MAX_LISTED = 10_000


@dataclass(frozen=True)
class Listing:
    """The names a directory listing shows, sorted (see :meth:`Directory.readable_entries`):
    the first :data:`MAX_LISTED` of ``total``."""

    names: list[ListedName]
    total: int


def find_static(fs: RootFS, segments: list[str]) -> OpenedFile | Listing:
    """The open regular file, or the listing of the directory, that ``segments`` name.

    ``segments`` are validated URL path segments (``paths.clean_segments``); none is the
    root itself. The caller owns (and closes) a returned file. Raises :class:`NotFound` for
    anything missing or not to be seen, and :class:`Forbidden` where the server may not read.
    """
    try:
        if not segments:
            with fs.root() as top:
                return _listing(top, fs.read_follow)
        with fs.open_dir(segments[:-1]) as parent:
            found = parent.open_entry(segments[-1], follow=fs.read_follow)
        if isinstance(found, Directory):
            with found:
                return _listing(found, fs.read_follow)
        return found
    except PermissionError:
        raise Forbidden("forbidden") from None


def _listing(directory: Directory, follow: Follow) -> Listing:
    total = 0

    def counted() -> Iterator[tuple[str, bool]]:
        nonlocal total
        for entry in directory.readable_entries(follow=follow):
            total += 1
            yield entry

    names = []
    for name, is_dir in heapq.nsmallest(MAX_LISTED, counted()):
        size = 0
        if not is_dir:
            status = directory.stat(name, follow=follow)
            if status is None:
                continue  # gone meanwhile
            size = status.st_size
        names.append(ListedName(name, is_dir, size))
    return Listing(names, total)
