"""A dataset's ``info``: read, parsed and cached by the version of the file; the format of
one of its scales."""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from neurotrale_twisted.core.cache import LruCache
from neurotrale_twisted.core.errors import NotFound, ServerError
from neurotrale_twisted.core.imagery import ImageDataset

#: The largest ``info`` read (real ones are kilobytes, a few megabytes with many scales).
MAX_INFO_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ScaleFormat:
    """What ``info`` says the chunks of one scale hold."""

    key: str
    dtype: np.dtype[np.generic]
    num_channels: int


class InfoCache:
    """Parsed ``info`` files, by the identity and version of the file (re-read when it changes)."""

    def __init__(self) -> None:
        self._entries: LruCache[dict[str, object]] = LruCache(4096)

    def read(self, dataset: ImageDataset) -> tuple[dict[str, object], str, Hashable]:
        """The ``info`` of the open ``dataset`` as a dict, where it is (for messages) and the
        identity of the version read; :class:`NotFound` when it has none.

        Raises :class:`ServerError`, naming the file (its path, for the operator), when it
        is not a JSON object.
        """
        info = dataset.open_info()
        try:
            label = info.label
            identity = info.identity
            cached = self._entries.get(identity)
            if cached is not None:
                return cached, label, identity
            # Read no further than a limit: a sparse info of gigabytes costs its planter
            # nothing, and every chunk request would read it whole into memory.
            if info.size > MAX_INFO_BYTES:
                raise ServerError(f"{label} is larger than {MAX_INFO_BYTES} bytes")
            try:
                content = info.read_range(0, MAX_INFO_BYTES + 1)
                if len(content) > MAX_INFO_BYTES:  # it grew since it was opened
                    raise ServerError(f"{label} is larger than {MAX_INFO_BYTES} bytes")
                parsed = json.loads(content)
            except (OSError, ValueError) as e:
                raise ServerError(f"cannot read {label}: {e}") from e
            if not isinstance(parsed, dict):
                raise ServerError(f"{label} is not a JSON object")
            self._entries.put(identity, parsed)
            return parsed, label, identity
        finally:
            info.close()


def scale_format(info: dict[str, object], key: str, label: str = "info") -> ScaleFormat:
    """The format of scale ``key``; :class:`NotFound` if ``info`` has no such scale.

    Raises :class:`ServerError` naming ``label`` (the info file's path) when it is unusable.
    """
    scales = info.get("scales")
    if not isinstance(scales, list) or not any(
        isinstance(s, dict) and s.get("key") == key for s in scales
    ):
        raise NotFound(f"dataset has no scale {key!r}")
    try:
        dtype = np.dtype(str(info["data_type"]))
        channels = int(info.get("num_channels", 1))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as e:
        raise ServerError(f"{label}: bad data_type or num_channels: {e}") from e
    return ScaleFormat(key, dtype, channels)
