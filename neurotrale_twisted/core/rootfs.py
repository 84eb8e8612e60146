"""The only code that touches the data root's filesystem.

Everything under the data root is reached from a directory handle of the root, one
component at a time, with ``O_NOFOLLOW | O_DIRECTORY`` and ``dir_fd=`` (nginx's
``disable_symlinks`` does the same), and every later operation (open, create, link, rename,
remove, list) is made relative to the directory handle that was walked. So the directory that
was checked is the directory that is used: someone with write access to the data root who
swaps a directory for a symbolic link while a request runs makes the request fail, never
reach outside the root.

- Reads may follow links only where the operator allowed it (``--follow-symlinks``), and then
  only through :meth:`RootFS.open_dir` / :meth:`Directory.open_file` with ``follow=True``.
  Writes, locks, temporaries and versions never follow a link.
- Only regular files are opened for reading: a FIFO, socket or device is :class:`NotFound`,
  and is opened with ``O_NONBLOCK`` so that it never blocks a thread.
- Files are created exclusively (``O_CREAT | O_EXCL``, which never follows a link) under a
  name unique to this host, process and thread, then linked or renamed into place.

This module knows nothing of HTTP or Twisted. It raises :class:`NotFound` for what is absent
or not allowed to be seen, and lets other ``OSError``\\ s through for the caller to judge
(a full disk is not the same failure as a missing file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from neurotrale_twisted.core.errors import NotFound

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW
#: errno values that mean "this name is not a directory we may enter": a link (ELOOP with
#: O_NOFOLLOW), a file (ENOTDIR), or gone (ENOENT).
_NOT_A_DIRECTORY = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}
_NOT_A_FILE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO}
#: errno values of an opened file that vanished under its opener (removed, renamed over;
#: NFS: stale), and how often :meth:`Directory.open_entry` opens such a name again.
VANISHED = frozenset({errno.ENOENT, errno.ESTALE})
_REOPENS = 4

#: How links may be followed: ``False`` never (writes, locks, temporaries, versions),
#: :data:`INSIDE` when what the link leads to, resolved step by step from the root's handle,
#: stays inside the root (reads, by default), ``True`` anywhere (reads under the operator's
#: ``--follow-symlinks``).
INSIDE: Literal["inside"] = "inside"
Follow = bool | Literal["inside"]
#: The most links one lookup passes through (Linux's own limit), so that a loop ends.
MAX_LINK_HOPS = 40

#: A prefix of every temporary name, so that a clean-up can find them (they are dot-names:
#: never listed, never served).
TEMPORARY_PREFIX = ".tmp-"


def temporary_name(purpose: str = "") -> str:
    """A file name no other host, process or thread will pick: for exclusive creation.

    ``purpose`` (a plain name, for example the file it will replace) is kept in the name
    to help an operator who looks at the directory.
    """
    host = socket.gethostname().replace("/", "_")[:40] or "host"
    tag = purpose.replace("/", "_")[:60]
    return (
        f"{TEMPORARY_PREFIX}{tag}.{host}.{os.getpid()}.{threading.get_ident()}."
        f"{secrets.token_hex(6)}"
    )


def temporary_owner(name: str, purpose: str = "") -> int | None:
    """The process id of *this host* that made temporary ``name`` (for ``purpose``), if any.

    None when ``name`` is not such a temporary or was made on another host: only the age of
    those tells whether their writer is gone.
    """
    host = socket.gethostname().replace("/", "_")[:40] or "host"
    tag = purpose.replace("/", "_")[:60]
    prefix = f"{TEMPORARY_PREFIX}{tag}.{host}."
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix) :].split(".")
    if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()):
        return None
    return int(parts[0])


@dataclass(frozen=True)
class OpenedFile:
    """A regular file opened for reading, with the status of what was opened."""

    file: BinaryIO
    status: os.stat_result

    def read_all(self, limit: int | None = None) -> bytes:
        """The whole content, read from the open handle; at most ``limit`` bytes of it."""
        chunks: list[bytes] = []
        left = limit
        while left is None or left > 0:
            chunk = self.file.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            chunks.append(chunk)
            if left is not None:
                left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close the handle."""
        self.file.close()

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Directory:
    """An open directory under the data root: every operation is relative to its handle.

    ``relative`` is its path relative to the root (``""`` for the root), for messages
    that may be shown to clients and the log; it is never used to reach the directory.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, fd: int, relative: str, fs: RootFS | None = None) -> None:
        self.fd = fd
        self.relative = relative
        #: The root this handle was walked from: what resolves a link inside the root.
        self.fs = fs

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the handle (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten handle must not leak a descriptor for the life of the process.
        with contextlib.suppress(OSError):
            self.close()

    def status(self) -> os.stat_result:
        """The status of this directory itself (its device and inode identify it)."""
        return os.fstat(self.fd)

    def child_path(self, name: str) -> str:
        """``name`` inside this directory, relative to the root: for messages only."""
        return f"{self.relative}/{name}" if self.relative else name

    # -- walking ----------------------------------------------------------------------------

    def subdir(self, name: str, *, follow: Follow = False) -> Directory:
        """The subdirectory ``name``, opened without following a link unless ``follow``.

        Raises :class:`NotFound` when it is missing, a link that ``follow`` does not allow
        (see :data:`Follow`) or not a directory.
        """
        _check_name(name)
        flags = _DIR_FLAGS | (0 if follow is True else _NOFOLLOW)
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except OSError as e:
            if e.errno in _NOT_A_DIRECTORY:
                if follow == INSIDE and self._is_link(name):
                    parent, final = self._inside_target(name)
                    if final is None:
                        return parent
                    with parent:
                        return parent.subdir(final)
                raise NotFound(f"{self.child_path(name)} is not a directory") from None
            raise
        return Directory(fd, self.child_path(name), self.fs)

    def walk(self, names: Iterable[str], *, follow: Follow = False) -> Directory:
        """The directory reached through ``names`` from here, each opened as :meth:`subdir`.

        Returns a new handle (this one stays open); raises :class:`NotFound` as
        :meth:`subdir` does.
        """
        current = Directory(os.dup(self.fd), self.relative, self.fs)
        for name in names:
            try:
                nxt = current.subdir(name, follow=follow)
            finally:
                current.close()
            current = nxt
        return current

    def make_subdir(self, name: str, mode: int = 0o775) -> Directory:
        """Create subdirectory ``name`` (it may already exist) and open it, never through a link.

        Raises :class:`NotFound` when the name exists and is not a directory (or is a
        link), and ``OSError`` when it cannot be created (full disk, permissions).
        """
        _check_name(name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=self.fd)
        return self.subdir(name)

    # -- reading ----------------------------------------------------------------------------

    def open_file(self, name: str, *, follow: Follow = False) -> OpenedFile:
        """Open regular file ``name`` for reading, following a link only as ``follow`` allows.

        Raises :class:`NotFound` for a missing name, a link that ``follow`` does not allow,
        a directory, or anything that is not a regular file (FIFO, socket, device: opened
        with ``O_NONBLOCK`` so they never block).
        """
        found = self.open_entry(name, follow=follow)
        if isinstance(found, Directory):
            found.close()
            raise NotFound(f"{self.child_path(name)} is a directory")
        return found

    def open_entry(self, name: str, *, follow: Follow = False) -> Directory | OpenedFile:
        """Open ``name`` if it is a directory or a regular file, and tell which by what it is.

        For a file server, which lists the one and serves the other: a single open, and the
        status of what was opened decides, so a name swapped between the two meanwhile cannot
        be mistaken. A link is followed only as ``follow`` allows. Raises :class:`NotFound`
        for a missing name, a link that may not be followed, and anything else (a FIFO, socket
        or device is not even opened, and would be opened with ``O_NONBLOCK``). A file that
        vanishes between its open and its ``fstat`` (renamed over by another host, on FUSE
        or NFS) is opened again, up to :data:`_REOPENS` times, then its ``OSError`` raised.
        """
        _check_name(name)
        before = self.lstat(name) if follow is not True else self.stat(name, follow=True)
        if before is not None and stat.S_ISLNK(before.st_mode):
            if follow != INSIDE:
                raise NotFound(f"{self.child_path(name)} is a link")
            parent, final = self._inside_target(name)
            if final is None:
                return parent
            with parent:
                return parent.open_entry(final)
        if before is None or not (stat.S_ISDIR(before.st_mode) or stat.S_ISREG(before.st_mode)):
            raise NotFound(f"{self.child_path(name)} is not a file or directory")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow is True else _NOFOLLOW)
        for attempt in range(_REOPENS):
            try:
                fd = os.open(name, flags, dir_fd=self.fd)
            except OSError as e:
                if e.errno in _NOT_A_FILE:
                    raise NotFound(f"{self.child_path(name)} does not exist") from None
                raise
            try:
                status = os.fstat(fd)
            except OSError as e:
                os.close(fd)
                # Renamed over (or removed) between the open and the fstat, as FUSE file
                # systems and NFS can tell: what the name holds now is opened again.
                if e.errno not in VANISHED or attempt == _REOPENS - 1:
                    raise
                time.sleep(0.001 * attempt)
                continue
            try:
                if stat.S_ISDIR(status.st_mode):
                    return Directory(fd, self.child_path(name), self.fs)
                if not stat.S_ISREG(status.st_mode):
                    raise NotFound(f"{self.child_path(name)} is not a regular file")
                return OpenedFile(os.fdopen(fd, "rb", buffering=0), status)
            except BaseException:
                os.close(fd)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def read_file(self, name: str, *, follow: Follow = False) -> tuple[bytes, os.stat_result]:
        """The content and status of regular file ``name`` (see :meth:`open_file`)."""
        with self.open_file(name, follow=follow) as opened:
            return opened.read_all(), opened.status

    def lstat(self, name: str) -> os.stat_result | None:
        """The status of ``name`` itself (a link is not followed), or None when missing."""
        _check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def stat(self, name: str, *, follow: Follow = False) -> os.stat_result | None:
        """The status of ``name``, through a link only as ``follow`` allows; None when missing
        (or a link that may not be followed, or leads nowhere)."""
        if follow is False:
            return self.lstat(name)
        _check_name(name)
        if follow == INSIDE:
            status = self.lstat(name)
            if status is None or not stat.S_ISLNK(status.st_mode):
                return status
            try:
                parent, final = self._inside_target(name)
            except (NotFound, OSError):
                return None
            with parent:
                return os.fstat(parent.fd) if final is None else parent.lstat(final)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=True)
        except OSError:
            return None

    def _is_link(self, name: str) -> bool:
        status = self.lstat(name)
        return status is not None and stat.S_ISLNK(status.st_mode)

    def _inside_target(self, name: str) -> tuple[Directory, str | None]:
        """Where link ``name`` here leads, resolved inside the root: the open directory that
        holds the final name, and that name (which was not a link when it was looked at); or
        the root itself and None, for a link to the root.

        Each step is taken from the root's handle without following anything, and each link
        met is read and expanded in place (as the kernel would, ``..`` after it included), so
        whatever the names are changed to meanwhile, the result is inside the root. Raises
        :class:`NotFound` for a link that leaves the root (an absolute target outside it, or
        ``..`` above it), leads nowhere, or passes through more than :data:`MAX_LINK_HOPS`
        links.
        """
        fs = self.fs
        if fs is None:
            raise NotFound(f"{self.child_path(name)} is a link")
        resolved = [part for part in self.relative.split("/") if part]
        pending = [name]
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise NotFound(f"{self.child_path(name)} leads out of the root")
                resolved.pop()
                continue
            with fs.root() as top, top.walk(resolved) as here:
                status = here.lstat(part)
                if status is not None and stat.S_ISLNK(status.st_mode):
                    hops += 1
                    if hops > MAX_LINK_HOPS:
                        raise NotFound(f"{self.child_path(name)} passes through too many links")
                    try:
                        target = os.readlink(part, dir_fd=here.fd)
                    except OSError as e:
                        # Changed since it was looked at: as if it were missing.
                        if e.errno in (errno.EINVAL, *_NOT_A_FILE):
                            raise NotFound(f"{self.child_path(name)} does not exist") from None
                        raise
                    if target.startswith("/"):
                        inside = _inside_of(target, fs.path)
                        if inside is None:
                            raise NotFound(f"{self.child_path(name)} leads out of the root")
                        resolved = []
                        pending = inside + pending
                    else:
                        pending = target.split("/") + pending
                    continue
            resolved.append(part)
        if not resolved:
            return fs.root(), None
        with fs.root() as top:
            return top.walk(resolved[:-1]), resolved[-1]

    def is_file(self, name: str) -> bool:
        """Whether ``name`` is a regular file here (a link is not one)."""
        st = self.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_dir(self, name: str) -> bool:
        """Whether ``name`` is a directory here (a link to one is not)."""
        st = self.lstat(name)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def entries(self) -> Iterator[os.DirEntry[str]]:
        """The entries of this directory (their types as on disk: links are links)."""
        with os.scandir(self.fd) as scan:
            yield from scan

    def readable_entries(self, *, follow: Follow = False) -> Iterator[tuple[str, bool]]:
        """``(name, is_directory)`` of each directory and regular file here that reads may reach.

        For listings and the dataset index. Left out: dot-names (history, locks,
        temporaries), names that are not UTF-8 (no URL can name them, and a page cannot
        show them), links unless ``follow`` (and then links that lead nowhere), FIFOs,
        sockets and devices. In the order of the directory; sort them to show them.
        """
        for entry in self.entries():
            if entry.name.startswith(".") or not _is_utf8(entry.name):
                continue
            try:
                if entry.is_symlink():
                    if not follow:
                        continue
                    if follow == INSIDE:
                        target = self.stat(entry.name, follow=INSIDE)
                        if target is None:
                            continue
                        is_dir = stat.S_ISDIR(target.st_mode)
                        is_file = stat.S_ISREG(target.st_mode)
                    else:
                        is_dir, is_file = entry.is_dir(), entry.is_file()
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if is_dir or is_file:
                yield entry.name, is_dir

    def names(self) -> list[str]:
        """The names in this directory."""
        return os.listdir(self.fd)

    # -- writing ----------------------------------------------------------------------------

    def create_exclusive(self, name: str, content: bytes, mode: int = 0o664) -> None:
        """Create ``name`` holding ``content``, durably; fail if the name exists in any form.

        ``O_CREAT | O_EXCL`` never follows a link: a planted link makes this fail with
        ``FileExistsError``, it never creates the link's target. The content is fsynced
        before return. On any failure the partial file is removed. Raises ``OSError``
        (``FileExistsError`` when the name is taken, ``ENOSPC``/``EDQUOT`` when full).
        """
        _check_name(name)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=self.fd,
        )
        try:
            view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.remove(name)
            raise
        os.close(fd)

    def create_empty(self, name: str, mode: int = 0o664) -> None:
        """Create the empty file ``name``; ``FileExistsError`` if the name exists in any form.

        Not fsynced: it holds nothing; :meth:`sync` of this directory makes the name durable.
        """
        _check_name(name)
        os.close(
            os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=self.fd,
            )
        )

    def write_temporary(self, content: bytes, purpose: str = "", mode: int = 0o664) -> str:
        """Write ``content`` durably to a new temporary (dot-)file here; return its name."""
        while True:
            name = temporary_name(purpose)
            try:
                self.create_exclusive(name, content, mode)
            except FileExistsError:
                continue
            return name

    def open_lock(self, name: str, mode: int = 0o664) -> int:
        """A descriptor of lock file ``name``, created if missing, never through a link.

        For ``fcntl`` locks between the threads and processes of one host. Raises
        :class:`NotFound` when the name is a link or not a regular file.
        """
        _check_name(name)
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                mode,
                dir_fd=self.fd,
            )
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise NotFound(f"{self.child_path(name)} is not a lock file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(f"{self.child_path(name)} is not a lock file")
        return fd

    def link(self, source: str, target: str, target_dir: Directory | None = None) -> None:
        """Make ``target`` (in ``target_dir``, else here) a new name of file ``source``.

        Atomic and exclusive on every POSIX filesystem: raises ``FileExistsError`` when
        ``target`` exists, whatever it is. Links are never followed.
        """
        _check_name(source)
        _check_name(target)
        os.link(
            source,
            target,
            src_dir_fd=self.fd,
            dst_dir_fd=(target_dir or self).fd,
            follow_symlinks=False,
        )

    def rename(self, source: str, target: str, target_dir: Directory | None = None) -> None:
        """Rename ``source`` to ``target`` (in ``target_dir``, else here), replacing it.

        Atomic: readers of ``target`` see the old file or the new one. A link at
        ``target`` is replaced, never followed.
        """
        _check_name(source)
        _check_name(target)
        os.rename(source, target, src_dir_fd=self.fd, dst_dir_fd=(target_dir or self).fd)

    def remove(self, name: str) -> bool:
        """Remove ``name`` (a file or a link, never what a link points to). False if missing."""
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def set_modified(self, name: str, mtime_ns: int) -> None:
        """Set the access and modification times of ``name`` (never through a link)."""
        _check_name(name)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    def identity(self) -> tuple[int, int]:
        """The device and inode of this directory: to tell whether a path still leads here."""
        status = os.fstat(self.fd)
        return status.st_dev, status.st_ino

    def sync(self) -> None:
        """fsync this directory, so that names created or renamed in it are durable."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            # Some network filesystems refuse fsync on a directory; the rename still holds.
            if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
                raise


class RootFS:
    """The data root, held open: the one way in to its files.

    ``follow_symlinks`` is the operator's ``--follow-symlinks``: it lets *reads* pass
    through symbolic links (datasets linked in from other disks); nothing else does.
    Raises ``OSError`` when the root cannot be opened as a directory.
    """

    def __init__(self, root: str | os.PathLike[str], follow_symlinks: bool = False) -> None:
        self.path = os.path.realpath(root)
        self.follow_symlinks = follow_symlinks
        self._fd = os.open(self.path, _DIR_FLAGS)

    def close(self) -> None:
        """Close the root's handle."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def still_at_path(self) -> bool:
        """Whether the held root is still the directory at its path.

        False once it was removed, or moved away or replaced by another directory: the
        server would go on serving the old one, which the operator should hear of (the
        health check). Raises ``OSError`` when the held root cannot even be examined.
        """
        held = os.fstat(self._fd)
        try:
            current = os.stat(self.path)
        except OSError:
            return False
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (
            current.st_dev,
            current.st_ino,
        )

    @property
    def read_follow(self) -> Follow:
        """How reads follow links: anywhere under ``--follow-symlinks``, else inside the root."""
        return True if self.follow_symlinks else INSIDE

    def may_read(self) -> bool:
        """Whether this process may still list and enter the held root.

        The handle opened at start-up lists the root whatever its mode became since, but
        every walk below it needs the mode of now: a root made ``chmod 000`` (or one that
        may be listed but not entered) serves nothing. Checked with the effective ids.
        """
        return os.access(".", os.R_OK | os.X_OK, dir_fd=self._fd, effective_ids=True)

    def status_now(self, path: str, *, follow: bool = False) -> os.stat_result | None:
        """The status of what ``path`` (relative to the root, ``/``-separated, validated
        names) is now; None when nothing is there.

        One system call: the kernel resolves the directories on the way, through any link
        among them; the last name's link is followed only with ``follow``. So it never
        decides what may be read: it only tells whether what a walk opened before is still
        there (see :meth:`~neurotrale_twisted.core.imagery.RootImagery.versions_now`, which
        checks each directory on the way with a call of its own). Raises ``OSError`` for
        anything but a missing name, and ``ValueError`` for a path that is absolute or has
        a ``..`` (the callers' names are validated: that is a bug).
        """
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"not a path inside the root: {path!r}")
        try:
            return os.stat(path, dir_fd=self._fd, follow_symlinks=follow)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def root(self) -> Directory:
        """A new handle of the root directory itself."""
        return Directory(os.dup(self._fd), "", self)

    def open_dir(self, names: Iterable[str], *, for_write: bool = False) -> Directory:
        """The directory that ``names`` (already validated path segments) lead to.

        For reads, links are followed only when the operator allowed it; for writes never.
        Raises :class:`NotFound` when a component is missing, not a directory, or a link
        that may not be followed.
        """
        follow = False if for_write else self.read_follow
        with self.root() as top:
            return top.walk(names, follow=follow)

    def open_file(self, names: list[str]) -> OpenedFile:
        """Open the regular file that ``names`` lead to, for reading (see :meth:`open_dir`)."""
        if not names:
            raise NotFound("not a file")
        with self.open_dir(names[:-1]) as directory:
            return directory.open_file(names[-1], follow=self.read_follow)


def _is_utf8(name: str) -> bool:
    """Whether file name ``name`` (decoded with ``surrogateescape``) was valid UTF-8 on disk."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(name: str) -> None:
    """Refuse a name that is not one plain component (a bug in the caller, not the client)."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise ValueError(f"not a plain file name: {name!r}")


def _inside_of(target: str, root: str) -> list[str] | None:
    """The components of absolute path ``target`` below ``root``, or None when not below it."""
    if target == root:
        return []
    prefix = root.rstrip("/") + "/"
    if not target.startswith(prefix):
        return None
    return target[len(prefix) :].split("/")
