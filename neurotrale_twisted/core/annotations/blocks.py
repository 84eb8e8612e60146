"""The block of an annotation URL, resolved to a block directory of the dataset.

The viewer names a block by a point, ``x{X}y{Y}z{Z}`` in voxels; datasets name their block
directories ``x{i}y{j}z{k}`` or, the legacy way, ``x{i+1:04d}_y{j+1:04d}``, with the block
size in ``annotations/block_info.csv``. This is the contract's "The block in the URL": an
existing directory as written, else the block holding the point under either naming, else
(writes) the directory a write creates. Nothing is created here. Pure Python and blocking.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from neurotrale_twisted.core.annotations.places import (
    disk_errors,
    enter,
    open_dataset,
    segments_of,
)
from neurotrale_twisted.core.annotations.records import ANNOTATION_NAME, quoted
from neurotrale_twisted.core.errors import BadRequest, NotFound, ServerError
from neurotrale_twisted.core.paths import DataRoot, clean_segments
from neurotrale_twisted.core.rootfs import Directory, Follow

#: The block name the viewer builds from a point: ``x{X}y{Y}z{Z}``, voxel coordinates.
_BLOCK_POINT = re.compile(r"^x(-?[0-9]+)y(-?[0-9]+)z(-?[0-9]+)\Z")
#: A block directory named the legacy way: ``x{i+1:04d}_y{j+1:04d}``.
_LEGACY_BLOCK = re.compile(r"^x[0-9]{4}_y[0-9]{4}\Z")


def locate(root: DataRoot, dataset: Path, block: str, name: str, *, for_write: bool) -> Path:
    """The path of annotation file ``name`` of URL block ``block`` in ``dataset``.

    Follows the contract's block resolution: an existing ``annotations/{block}``
    directory; else the block of ``block_info.csv`` that holds the point, under either
    naming; else, for writes only, a directory for the write to create, named as the
    dataset already names its blocks. Nothing is created here. The path is a name: the
    reads and writes that take it walk from the data root again.

    Raises :class:`BadRequest` for a bad file or block name, or (writes) a point outside
    the volume or a block name that is not ``x{X}y{Y}z{Z}``; :class:`NotFound` (reads)
    when no directory matches, and for reads and writes alike when ``dataset`` is no
    dataset (has no ``info`` file); :class:`Forbidden` (writes) when a path would pass
    through a link; :class:`ServerError` when ``block_info.csv`` or ``info`` is unreadable.
    """
    segments = segments_of(root, dataset, for_write=for_write)
    with (
        disk_errors(root, "/".join(segments), reading=not for_write),
        open_dataset(root, segments, for_write=for_write) as directory,
    ):
        if not ANNOTATION_NAME.match(name):
            raise BadRequest(
                f"bad annotation file name {quoted(name)}: use letters, digits, '-', '_' and "
                "'.', ending in '.json'"
            )
        if clean_segments([block]) != [block]:
            raise BadRequest(f"bad block name {quoted(block)}")
        dirname = _block_dirname(root, directory, block, for_write=for_write)
        return dataset / "annotations" / dirname / name


def _block_dirname(root: DataRoot, dataset: Directory, block: str, *, for_write: bool) -> str:
    follow = root.fs.read_follow
    annotations = enter(root, dataset, "annotations", for_write=for_write)
    try:
        if annotations is not None and _is_block(root, annotations, block, for_write):
            return block
        size = _block_size(annotations, follow) if annotations is not None else None
        match = _BLOCK_POINT.match(block)
        point = (int(match[1]), int(match[2]), int(match[3])) if match else None
        index: tuple[int, int, int] | None = None
        if size is not None and point is not None:
            # A point outside the volume names no block, even one whose directory exists.
            try:
                _check_inside(dataset, point, follow)
            except BadRequest as e:
                raise e if for_write else NotFound(e.message) from None
            index = (point[0] // size[0], point[1] // size[1], point[2] // size[2])
            assert annotations is not None
            for candidate in (_block_dir_name(index), _legacy_dir_name(index)):
                if _is_block(root, annotations, candidate, for_write):
                    return candidate

        if not for_write:
            raise NotFound(f"no annotation block {block} in this dataset")
        if point is None:
            raise BadRequest(f"block {quoted(block)} does not exist and is not x{{X}}y{{Y}}z{{Z}}")
        if index is None:  # with a block size, the point was checked above
            _check_inside(dataset, point, follow)
            if block != _block_dir_name(point):
                raise BadRequest(
                    f"block {quoted(block)} does not exist; write it as "
                    f"{_block_dir_name(point)} (no leading zeros)"
                )
            return block
        assert annotations is not None
        legacy = _uses_legacy_names(annotations)
        return _legacy_dir_name(index) if legacy else _block_dir_name(index)
    finally:
        if annotations is not None:
            annotations.close()


def _is_block(root: DataRoot, annotations: Directory, name: str, for_write: bool) -> bool:
    directory = enter(root, annotations, name, for_write=for_write)
    if directory is None:
        return False
    directory.close()
    return True


def _block_size(annotations: Directory, follow: Follow) -> tuple[int, int, int] | None:
    """The block size of ``annotations/block_info.csv``, read afresh; None without one.

    Tolerates a header line, blank lines, whitespace and ``#`` comments. Raises
    :class:`ServerError` when the file exists but gives no block size.
    """
    try:
        raw, _ = annotations.read_file("block_info.csv", follow=follow)
    except NotFound:
        return None
    for line in raw.decode("utf-8", "replace").splitlines():
        line = line.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        parts = [p for p in re.split(r"[,;\s]+", line) if p]
        if len(parts) != 3:
            continue
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            continue  # a header line
        if all(math.isfinite(n) and n >= 1 and n == int(n) for n in numbers):
            return int(numbers[0]), int(numbers[1]), int(numbers[2])
    csv = annotations.child_path("block_info.csv")
    raise ServerError(f"{csv} does not give a block size 'sx,sy,sz'")


def _check_inside(dataset: Directory, point: tuple[int, int, int], follow: Follow) -> None:
    """Raise :class:`BadRequest` unless ``point`` lies in the volume of ``info``."""
    try:
        raw, _ = dataset.read_file("info", follow=follow)
        size = json.loads(raw)["scales"][0]["size"]
        bounds = (int(size[0]), int(size[1]), int(size[2]))
    except (NotFound, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ServerError(
            f"{dataset.child_path('info')} gives no volume size (scales[0].size)"
        ) from e
    if any(not 0 <= p < s for p, s in zip(point, bounds, strict=True)):
        raise BadRequest(
            f"point ({point[0]}, {point[1]}, {point[2]}) is outside the volume "
            f"(size {bounds[0]} x {bounds[1]} x {bounds[2]})"
        )


def _uses_legacy_names(annotations: Directory) -> bool:
    return any(
        _LEGACY_BLOCK.match(e.name) and e.is_dir(follow_symlinks=False)
        for e in annotations.entries()
    )


def _block_dir_name(index: tuple[int, int, int]) -> str:
    return f"x{index[0]}y{index[1]}z{index[2]}"


def _legacy_dir_name(index: tuple[int, int, int]) -> str:
    return f"x{index[0] + 1:04d}_y{index[1] + 1:04d}"
