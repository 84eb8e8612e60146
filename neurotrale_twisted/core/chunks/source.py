"""The chunk source: finds, decodes, compresses and caches the chunks of a store of imagery.

A chunk ``x0-x1_y0-y1_z0-z1`` of scale ``key`` is the file of that name (``.tiff`` or ``.tif``)
in the scale's directory of the dataset. Clients want its voxels as little-endian bytes, x
fastest, then y, z and channel; the body must be exactly ``(x1-x0)*(y1-y0)*(z1-z0)*num_channels
*itemsize`` bytes. Files are read through :class:`~neurotrale_twisted.core.imagery.Imagery`
alone. Pure Python: no Twisted here; the web layer runs :meth:`ChunkSource.respond` on a
thread pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from neurotrale_twisted.core.cache import LruCache
from neurotrale_twisted.core.chunks.info import InfoCache, ScaleFormat, scale_format
from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.core.chunks.tiff import RawLayout, decode_tiff, read_layout
from neurotrale_twisted.core.encoding import encode_body
from neurotrale_twisted.core.errors import ServerError
from neurotrale_twisted.core.imagery import ImageFile, Imagery, KnowsVersions, RootImagery
from neurotrale_twisted.core.paths import DataRoot


@dataclass(frozen=True)
class ChunkResponse:
    """A chunk ready to send: the body in ``coding`` (None: identity), or no body at all
    when the client already holds this representation (the web layer answers 304)."""

    body: bytes | None
    coding: str | None
    etag: str
    modified: float


def tagged(etag: str, coding: str | None) -> str:
    """The ETag of the ``coding`` representation of a body whose identity ETag is ``etag``."""
    return etag if coding is None else f"{etag[:-1]}-{coding}{etag[-1]}"


@dataclass(frozen=True, slots=True)
class _Answered:
    """What a chunk URL was answered from: its files' versions, and its answer's version."""

    versions: Hashable
    version: tuple[Hashable, ...]
    etag: str
    modified: float


def _opened_are(now: Hashable, info: Hashable, chunk: Hashable) -> bool:
    """Whether the files opened are those whose versions ``now`` (``RootImagery``'s) names:
    else a file changed between the look and the open, and ``now`` must not vouch for it."""
    if not isinstance(now, tuple) or len(now) != 4:
        return False
    return bool(now[0] == info and now[2] == chunk)


class ChunkObserver(Protocol):
    """Told about chunk reads, for the metrics (``metrics.ServerMetrics`` is one)."""

    def chunk_decoded(self, seconds: float) -> None:
        """A chunk's file was read and decoded into raw bytes in ``seconds``."""

    def chunk_cache(self, hit: bool) -> None:
        """An answer was looked up in the response cache: found (True) or not."""


class ChunkSource:
    """Finds, decodes, compresses and caches the chunks of the datasets of one store.

    Uncompressed TIFFs whose voxels already lie in the file in the raw encoding's order are
    answered with one read of that byte range (the TIFF header is parsed once per file
    version); the rest are decoded with tifffile. Encoded answers are kept in a bounded
    :class:`LruCache` keyed by the file's identity (its version) and the coding, so an edited
    file is never served stale.
    """

    def __init__(
        self,
        store: DataRoot | Imagery,
        cache_bytes: int = 32 * 1024 * 1024,
        observer: ChunkObserver | None = None,
    ) -> None:
        self.imagery: Imagery = RootImagery(store) if isinstance(store, DataRoot) else store
        self._knows = self.imagery if isinstance(self.imagery, KnowsVersions) else None
        self.observer = observer
        self.infos = InfoCache()
        self.responses: LruCache[tuple[bytes, str | None]] = LruCache(
            cache_bytes, lambda entry: len(entry[0]) + 200
        )
        self.layouts: LruCache[tuple[RawLayout | None]] = LruCache(16384)
        #: What each chunk URL was last answered from: the versions of its files
        #: (``KnowsVersions.versions_now``, taken before they were opened) and what the answer
        #: depends on, so that a hit whose files are unchanged is found without opening them.
        #: (About 1.5 KB an entry; an answer the response cache let go is no use here.)
        self.answered: LruCache[_Answered] = LruCache(4096)

    def respond(
        self,
        dataset: list[str],
        key: str,
        name: ChunkName,
        coding: str | None = None,
        client_has: Callable[[str], bool] | None = None,
    ) -> ChunkResponse:
        """Chunk ``name`` of scale ``key`` of the dataset that the validated path segments
        ``dataset`` name, in ``coding`` when that makes it smaller.

        ``client_has`` is asked about the ETags of the file's current representations; when it
        holds one, the answer has no body. Raises :class:`NotFound` for a missing dataset,
        scale or chunk, :class:`Forbidden` for one the server may not read, and
        :class:`ServerError` for a file that does not fit ``info``. An answer still cached
        for files whose versions (:class:`KnowsVersions`) have not changed since, their
        directories' modes and owners included, is given without opening them.
        """
        where = (tuple(dataset), key, name.stem)
        now = self._knows.versions_now(dataset, key, name.stem) if self._knows else None
        if now is not None:
            known = self.answered.get(where)
            if known is not None:
                quick = self._respond_known(
                    known, coding, client_has, lambda: known.versions == now
                )
                if quick is not None:
                    return quick
        return self._respond_opened(dataset, key, name, coding, client_has, where, now)

    def respond_known(
        self,
        dataset: list[str],
        key: str,
        name: ChunkName,
        coding: str | None = None,
        client_has: Callable[[str], bool] | None = None,
    ) -> ChunkResponse | None:
        """:meth:`respond`'s answer when it needs no file opened (the files are unchanged
        since the answer was cached, as a few ``stat`` calls tell), else None."""
        knows = self._knows
        known = self.answered.get((tuple(dataset), key, name.stem))
        if knows is None or known is None:
            return None

        def unchanged() -> bool:
            return knows.versions_now(dataset, key, name.stem) == known.versions

        return self._respond_known(known, coding, client_has, unchanged)

    def _respond_opened(
        self,
        dataset: list[str],
        key: str,
        name: ChunkName,
        coding: str | None,
        client_has: Callable[[str], bool] | None,
        where: tuple[object, ...],
        now: Hashable | None,
    ) -> ChunkResponse:
        """:meth:`respond` with the files opened; what it answered is remembered under
        ``now``, the versions looked at before they were opened."""
        opened = self.imagery.open_dataset(dataset)
        try:
            info, label, info_identity = self.infos.read(opened)
            fmt = scale_format(info, key, label)
            file = opened.open_chunk(key, name.stem)
        finally:
            opened.close()
        try:
            answer, version = self._respond(file, name, fmt, coding, client_has)
            if now is not None and _opened_are(now, info_identity, file.identity):
                self.answered.put(where, _Answered(now, version, file.etag, file.modified))
            return answer
        finally:
            file.close()

    def _respond_known(
        self,
        known: _Answered,
        coding: str | None,
        client_has: Callable[[str], bool] | None,
        unchanged: Callable[[], bool],
    ) -> ChunkResponse | None:
        """The answer for files unchanged since ``known`` was answered, if it needs no file
        opened: a 304, or a body the response cache still holds. ``unchanged`` (the look at
        the files) is asked only when there is such an answer: a miss costs no ``stat``."""
        if client_has is not None:
            for held in (tagged(known.etag, coding), known.etag):
                if client_has(held):
                    return ChunkResponse(None, None, held, known.modified) if unchanged() else None
        cached = self.responses.get((*known.version, coding))
        if cached is None or not unchanged():
            return None
        if self.observer is not None:
            self.observer.chunk_cache(hit=True)
        body, used = cached
        return ChunkResponse(body, used, tagged(known.etag, used), known.modified)

    def _respond(
        self,
        file: ImageFile,
        name: ChunkName,
        fmt: ScaleFormat,
        coding: str | None,
        client_has: Callable[[str], bool] | None,
    ) -> tuple[ChunkResponse, tuple[Hashable, ...]]:
        """:meth:`respond` for the chunk's open file, and what its body depends on."""
        etag = file.etag
        # What the body depends on: the file's version, and what the name and info ask of it.
        version: tuple[Hashable, ...] = (
            file.identity,
            name.stem,
            fmt.dtype.str,
            fmt.num_channels,
        )
        if client_has is not None:
            for held in (tagged(etag, coding), etag):
                if client_has(held):
                    return ChunkResponse(None, None, held, file.modified), version
        cached = self.responses.get((*version, coding))
        if self.observer is not None:
            self.observer.chunk_cache(hit=cached is not None)
        if cached is None:
            raw = self.responses.get((*version, None)) if coding is not None else None
            raw_body = raw[0] if raw is not None else self._timed_raw(file, name, fmt)
            if raw is None and coding is not None:
                self.responses.put((*version, None), (raw_body, None))
            cached = encode_body(raw_body, coding)
            self.responses.put((*version, coding), cached)
        body, used = cached
        return ChunkResponse(body, used, tagged(etag, used), file.modified), version

    def _timed_raw(self, file: ImageFile, name: ChunkName, fmt: ScaleFormat) -> bytes:
        """:meth:`_raw`, its duration told to the observer."""
        started = time.perf_counter()
        raw = self._raw(file, name, fmt)
        if self.observer is not None:
            self.observer.chunk_decoded(time.perf_counter() - started)
        return raw

    def _raw(self, file: ImageFile, name: ChunkName, fmt: ScaleFormat) -> bytes:
        """The chunk's raw bytes: one read of a byte range when the file allows, else decoding."""
        entry = self.layouts.get(file.identity)
        if entry is None:
            entry = (read_layout(file.stream(), file.label),)
            self.layouts.put(file.identity, entry)
        layout = entry[0]
        z, y, x = name.shape
        if (
            layout is not None
            and fmt.num_channels == 1
            and layout.dtype == fmt.dtype.newbyteorder("<")
            and layout.nbytes == z * y * x * layout.dtype.itemsize
            and layout.shape[-2:] == (y, x)
        ):
            data = file.read_range(layout.offset, layout.nbytes)
            if len(data) != layout.nbytes:
                raise ServerError(f"{file.label}: truncated: {len(data)} of {layout.nbytes} bytes")
            return data
        return decode_tiff(file.stream(), name, fmt, file.label)
