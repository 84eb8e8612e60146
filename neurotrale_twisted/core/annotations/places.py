"""Where annotation files are: walking to a dataset and its block directories from the root.

An annotation file's path is a name only: ``{dataset}/annotations/{blockdir}/{name}.json``
below the data root. Every access walks there again from the data root's directory handle
(:mod:`neurotrale_twisted.core.rootfs`): never through a link for a write, through one for a
read only where the operator allows it. A dataset is a directory with an ``info`` file. Disk
errors met on the way become the domain's 507 or 500, naming the place relative to the root.
Pure Python and blocking.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from neurotrale_twisted.core.annotations.commitlog import open_child
from neurotrale_twisted.core.annotations.records import ANNOTATION_NAME, quoted
from neurotrale_twisted.core.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ServerError,
    StorageFull,
)
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.core.rootfs import Directory


def segments_of(root: DataRoot, path: Path, *, for_write: bool) -> list[str]:
    """``path``'s components below the data root, found lexically (no disk access).

    Raises :class:`Forbidden` (writes) or :class:`NotFound` (reads) for a path outside the
    root, :class:`BadRequest` for an empty, ``.`` or ``..`` component or a NUL.
    """
    try:
        parts = list(path.relative_to(root.root).parts)
    except ValueError:
        if for_write:
            raise Forbidden("writes may not leave the data root") from None
        raise NotFound("not found") from None
    if any(p in ("", ".", "..") or "\x00" in p for p in parts):
        raise BadRequest("bad path")
    return parts


def file_parts(root: DataRoot, path: Path, *, for_write: bool) -> tuple[list[str], str, str]:
    """(dataset segments, block directory, file name) of an annotation file's path.

    Raises :class:`BadRequest` for a path that is not an annotation file's.
    """
    parts = segments_of(root, path, for_write=for_write)
    if len(parts) < 4 or parts[-3] != "annotations":
        raise BadRequest("not the path of an annotation file")
    if not ANNOTATION_NAME.match(parts[-1]):
        raise BadRequest(f"bad annotation file name {quoted(parts[-1])}")
    return parts[:-3], parts[-2], parts[-1]


def enter(root: DataRoot, parent: Directory, name: str, *, for_write: bool) -> Directory | None:
    """Subdirectory ``name`` of ``parent`` or None; a read follows a link if allowed.

    For writes a link is :class:`Forbidden` and a non-directory :class:`ServerError`.
    """
    if not for_write:
        try:
            return parent.subdir(name, follow=root.fs.read_follow)
        except NotFound:
            return None
    return open_child(parent, name, create=False, for_write=for_write)


def open_dataset(root: DataRoot, segments: list[str], *, for_write: bool) -> Directory:
    """The dataset directory, walked from the root; :class:`NotFound` without ``info``."""
    where = "/".join(segments)
    current = root.fs.root()
    try:
        for name in segments:
            child = enter(root, current, name, for_write=for_write)
            current.close()
            if child is None:
                raise NotFound(f"no dataset with an info file at {where!r}")
            current = child
        if not has_info(root, current, for_write=for_write):
            raise NotFound(f"no dataset with an info file at {where!r}")
    except BaseException:
        current.close()
        raise
    return current


def has_info(root: DataRoot, dataset: Directory, *, for_write: bool) -> bool:
    """Whether ``dataset`` holds a regular ``info`` file (a write never follows a link)."""
    status = dataset.stat("info", follow=False if for_write else root.fs.read_follow)
    return status is not None and stat.S_ISREG(status.st_mode)


def open_block_for_read(root: DataRoot, segments: list[str], block: str) -> Directory:
    """The block directory for a read (links followed where the operator allows)."""
    return root.fs.open_dir([*segments, "annotations", block])


def check_place(root: DataRoot, segments: list[str], block: str, held: Directory) -> None:
    """Raise :class:`NotFound` unless the root still leads to ``held`` through the path.

    Run just before a commit: a dataset moved away (or whose ``info`` is gone), or an
    ``annotations`` or block directory swapped since the write began, fails the write.
    """
    gone = NotFound(f"{held.relative} was moved or replaced during the write")
    try:
        with open_dataset(root, segments, for_write=True) as dataset:
            annotations = open_child(dataset, "annotations", create=False, for_write=True)
            if annotations is None:
                raise gone
            with annotations:
                current = open_child(annotations, block, create=False, for_write=True)
                if current is None:
                    raise gone
                with current:
                    if current.identity() != held.identity():
                        raise gone
    except (NotFound, Forbidden, ServerError):
        raise gone from None


@contextlib.contextmanager
def disk_errors(root: DataRoot, where: str, *, reading: bool = False) -> Iterator[None]:
    """Turn an ``OSError`` into :class:`StorageFull` (507), :class:`Forbidden` (403: a read
    of what the server's user may not read, as a static server answers it) or
    :class:`ServerError` (500: anything else, a write the server may not make included: the
    server's configuration is at fault, not the client).

    The client's message names ``where`` (relative to the data root), never an absolute
    path; the log gets the absolute one and the system's message.
    """
    try:
        yield
    except OSError as e:
        detail = f"{os.path.join(root.root, where)}: {e!r}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(
                f"no space left to write {where} (the disk is full or over quota); "
                "nothing was changed",
                detail=detail,
            ) from e
        if reading and e.errno in (errno.EACCES, errno.EPERM):
            raise Forbidden(f"the server may not read {where}", detail=detail) from e
        raise ServerError(f"cannot access {where}: {e.strerror or e}", detail=detail) from e
