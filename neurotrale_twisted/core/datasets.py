"""Finding the datasets under the data root, for the index page."""

from __future__ import annotations

from neurotrale_twisted.core.errors import NotFound
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.core.rootfs import Directory

#: How deep below the root the index looks for datasets (``lab/2024/brain1`` is depth 3).
MAX_DEPTH = 6


def find_datasets(root: DataRoot, max_depth: int = MAX_DEPTH) -> list[str]:
    """The relative paths (``/``-separated, sorted) of every directory holding an ``info`` file.

    The walk goes through the data root's file layer: dot-directories are skipped, and so
    are links unless the root allows following them, and each directory is walked once
    (the first path reaching it, in sorted order, names it). A dataset's own
    subdirectories (scales, annotations) are not searched.
    """
    fs = root.fs
    found: list[str] = []
    #: (device, inode) of each directory walked: where links are followed, links to a
    #: directory already seen (``ln -s . x`` eight times: 8**6 paths) are walked once.
    seen: set[tuple[int, int]] = set()

    def walk(directory: Directory, depth: int) -> None:
        try:
            status = directory.status()
            if (status.st_dev, status.st_ino) in seen:
                return
            seen.add((status.st_dev, status.st_ino))
            entries = sorted(directory.readable_entries(follow=fs.read_follow))
        except OSError:
            return
        if directory.relative and ("info", False) in entries:
            found.append(directory.relative)
            return
        if depth >= max_depth:
            return
        for name, is_dir in entries:
            if not is_dir:
                continue
            try:
                child = directory.subdir(name, follow=fs.read_follow)
            except (NotFound, OSError):
                continue
            with child:
                walk(child, depth + 1)

    with fs.root() as top:
        walk(top, 0)
    return found
