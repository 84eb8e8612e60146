"""What identifies one version of a file's content, for caches and ETags.

A cache keyed by :func:`file_version` never serves an edited file stale, and
:func:`file_etag` changes whenever that version does.
"""

from __future__ import annotations

import hashlib
import os

#: One version of a file: device, inode, size, mtime and ctime (nanoseconds).
FileVersion = tuple[int, int, int, int, int]


def file_version(st: os.stat_result) -> FileVersion:
    """What identifies one version of a file's content: device, inode, size, mtime, ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_etag(st: os.stat_result) -> str:
    """A strong ETag for a file's current version (device, inode, size, mtime, ctime).

    The ctime changes on every write and cannot be set back, so a file rewritten in place
    with its old size and mtime restored (``cp -p``) still gets a new ETag.
    """
    ident = f"{file_version(st)}".encode()
    return '"' + hashlib.blake2b(ident, digest_size=12).hexdigest() + '"'
