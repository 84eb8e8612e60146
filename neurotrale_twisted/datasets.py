"""Finding the datasets under the data root, for the index page."""

from __future__ import annotations

import os

from .paths import DataRoot

#: How deep below the root the index looks for datasets (``lab/2024/brain1`` is depth 3).
MAX_DEPTH = 6


def find_datasets(root: DataRoot, max_depth: int = MAX_DEPTH) -> list[str]:
    """The relative paths (``/``-separated, sorted) of every directory holding an ``info`` file.

    Dot-directories are skipped, and so are links out of the root unless the root allows
    following them. A dataset's own subdirectories (scales, annotations) are not searched.
    """
    found: list[str] = []

    def walk(directory: str, relative: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        if relative and any(e.name == "info" and e.is_file() for e in entries):
            found.append(relative)
            return
        if depth >= max_depth:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if entry.is_symlink() and not root.may_read(entry.path):
                continue
            walk(entry.path, f"{relative}/{entry.name}" if relative else entry.name, depth + 1)

    walk(str(root.root), "", 0)
    return found
