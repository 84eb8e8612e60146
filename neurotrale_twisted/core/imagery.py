"""Where imagery is read from: the one interface the chunk source reads its files through.

A backend gives a dataset's files as :class:`ImageFile` objects: the bytes of a file (a
byte range, or a stream for decoding) and what identifies its current version, for caches
and ETags. :class:`RootImagery` is the backend of a data root on a file system; another
store (an object store, say) is one more module implementing :class:`Imagery`, with the
chunk source (:mod:`.chunks.source`) unchanged.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Hashable, Sequence
from typing import IO, BinaryIO, Protocol, cast, runtime_checkable

from neurotrale_twisted.core.chunks.names import CHUNK_EXTENSIONS
from neurotrale_twisted.core.errors import Forbidden, NotFound
from neurotrale_twisted.core.identity import file_etag, file_version
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.core.rootfs import Directory, OpenedFile


class ImageFile(Protocol):
    """One open file of imagery: a chunk's TIFF or a dataset's ``info``.

    What is read is the version that was opened, even if the file is replaced meanwhile.
    """

    #: Where the file is, for the operator's messages (may be an absolute path).
    label: str

    @property
    def identity(self) -> Hashable:
        """What identifies this version of the content: equal identities, equal bytes."""

    @property
    def etag(self) -> str:
        """A strong ETag of this version of the content."""

    @property
    def modified(self) -> float:
        """When the content was last changed, in seconds since the epoch."""

    @property
    def size(self) -> int:
        """The size of the content in bytes."""

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer only at the end of the file)."""

    def stream(self) -> IO[bytes]:
        """The content as a seekable stream from its start, for decoders (tifffile)."""

    def close(self) -> None:
        """Let the file go."""


class ImageDataset(Protocol):
    """One open dataset: its ``info`` and its chunks' files, all found from one lookup."""

    #: The dataset's path relative to the data root, for messages (``""`` for the root).
    relative: str

    def open_info(self) -> ImageFile:
        """The dataset's ``info`` file; :class:`NotFound` when it has none."""

    def open_chunk(self, key: str, stem: str) -> ImageFile:
        """The file of chunk ``stem`` (a chunk name without extension) of scale ``key``;
        :class:`NotFound` when there is none, :class:`Forbidden` when it may not be read."""

    def close(self) -> None:
        """Let the dataset go."""


class Imagery(Protocol):
    """A store of datasets of imagery."""

    def open_dataset(self, segments: Sequence[str]) -> ImageDataset:
        """The dataset the validated path ``segments`` name; :class:`NotFound` when there is
        none, :class:`Forbidden` when the server may not read it."""


@runtime_checkable
class KnowsVersions(Protocol):
    """What an :class:`Imagery` may offer besides (:class:`RootImagery` does): the versions
    of a chunk's files without opening them, so that a cached answer is served at once."""

    def versions_now(self, segments: Sequence[str], key: str, stem: str) -> Hashable | None:
        """What identifies, now and cheaply, the versions of the dataset's ``info`` and of
        the file of chunk ``stem`` of scale ``key``, as :meth:`ImageDataset.open_chunk` would
        find it; None when that cannot be told cheaply (or something is missing).

        Only ever compared with what it returned before the same files were opened and read
        (:class:`~.chunks.source.ChunkSource` keeps what it answered under it): equal means
        the files opened then are still the files there now. It never decides access.
        """


class _TiffStream(io.RawIOBase):
    """An open file as tifffile should see it: read and seek, and no file descriptor.

    tifffile opens other files beside one it reads (multi-file OME, MicroManager and NDTiff
    series name them) only when its handle has a descriptor; through this it reads this
    file alone. Starts at the beginning of the file.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        file.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._file.readinto(buffer)  # type: ignore[attr-defined, no-any-return]

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


class RootFile:
    """An :class:`ImageFile` of the data root: a regular file opened through :mod:`.rootfs`."""

    def __init__(self, opened: OpenedFile, label: str) -> None:
        self.opened = opened
        self.label = label

    @property
    def identity(self) -> Hashable:
        return file_version(self.opened.status)

    @property
    def etag(self) -> str:
        return file_etag(self.opened.status)

    @property
    def modified(self) -> float:
        return self.opened.status.st_mtime

    @property
    def size(self) -> int:
        return self.opened.status.st_size

    def read_range(self, offset: int, size: int) -> bytes:
        return os.pread(self.opened.file.fileno(), size, offset)

    def stream(self) -> IO[bytes]:
        return cast(IO[bytes], _TiffStream(self.opened.file))

    def close(self) -> None:
        self.opened.close()

    def __enter__(self) -> RootFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RootDataset:
    """An :class:`ImageDataset` of the data root: an open directory handle of the dataset,
    from which its ``info`` and its scales' chunk files are opened."""

    def __init__(self, root: DataRoot, directory: Directory) -> None:
        self._fs = root.fs
        self._directory = directory
        self.relative = directory.relative
        self._where = os.path.join(root.fs.path, directory.relative)

    def open_info(self) -> RootFile:
        try:
            opened = self._directory.open_file("info", follow=self._fs.read_follow)
        except NotFound:
            raise NotFound(f"no dataset with an info file at {self.relative or '/'!r}") from None
        except PermissionError:
            raise Forbidden("the server may not read this dataset's info") from None
        return RootFile(opened, os.path.join(self._where, "info"))

    def open_chunk(self, key: str, stem: str) -> RootFile:
        follow = self._fs.read_follow
        try:
            with self._directory.subdir(key, follow=follow) as scale:
                for ext in CHUNK_EXTENSIONS:
                    try:
                        opened = scale.open_file(stem + ext, follow=follow)
                    except NotFound:
                        continue
                    return RootFile(opened, os.path.join(self._where, key, stem + ext))
        except PermissionError:
            # A directory or file on the way that the server may not read (chmod 000).
            raise Forbidden("the server may not read this chunk") from None
        raise NotFound(f"no chunk {stem}")

    def close(self) -> None:
        self._directory.close()

    def __enter__(self) -> RootDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RootImagery:
    """The :class:`Imagery` of a data root: every file reached through :mod:`.rootfs` (a
    dataset directory walked from the root, then its files opened there, and only those
    open files read), so the file that was checked is the file that is decoded."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root

    def open_dataset(self, segments: Sequence[str]) -> RootDataset:
        try:
            return RootDataset(self.root, self.root.fs.open_dir(segments))
        except PermissionError:
            raise Forbidden("the server may not read this chunk") from None

    def versions_now(self, segments: Sequence[str], key: str, stem: str) -> Hashable | None:
        """A ``stat`` of the ``info``, of the chunk's file and of each directory on the way,
        from the root's handle, instead of opening and closing each as the walk does.

        Without ``--follow-symlinks``, a link anywhere on the way is None (the walk decides
        each time): the files are looked at without following a link, then each directory,
        so a dataset moved out of the root and linked back is never taken for the files
        that were read while it was inside. With it, links are followed, as reads do.
        """
        if not key or not stem or not all(segments):
            return None  # never a path from the file system's root
        fs = self.root.fs
        follow = fs.follow_symlinks
        base = "".join(f"{segment}/" for segment in segments)
        try:
            info = fs.status_now(f"{base}info", follow=follow)
            chunk = None
            for ext in CHUNK_EXTENSIONS:
                chunk = fs.status_now(f"{base}{key}/{stem}{ext}", follow=follow)
                if chunk is not None:
                    break
            if info is None or chunk is None:
                return None
            if not (stat.S_ISREG(info.st_mode) and stat.S_ISREG(chunk.st_mode)):
                return None
            directories = []
            walked = ""
            for name in [*segments, key]:
                walked += name
                status = fs.status_now(walked, follow=follow)
                if status is None or not stat.S_ISDIR(status.st_mode):
                    return None
                # Its ctime too: a chmod, chown or ACL that the walk (which opens each
                # directory, needing read permission where this needs search) would now
                # refuse changes it.
                directories.append((status.st_dev, status.st_ino, status.st_ctime_ns))
                walked += "/"
        except OSError:
            return None  # a directory on the way the server may not search, say
        return (file_version(info), ext, file_version(chunk), tuple(directories))
