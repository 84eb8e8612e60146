"""Chunk names: ``x0-x1_y0-y1_z0-z1`` (ends exclusive, in voxels), optionally ``.tiff``/``.tif``.

:data:`CHUNK_PATTERN` is the one definition of a chunk name: the routes, the OpenAPI
document and the metrics' route labels all use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: A number in a chunk name. ASCII digits only: ``\d`` would match other scripts' digits,
#: which ``int`` reads as the same number, so ``\u0660-64_...`` would be an alias of ``0-64_...``.
_NUMBER = "[0-9]+"
#: Extensions tried, in order, for the file of a chunk (a name may carry one of them).
CHUNK_EXTENSIONS = (".tiff", ".tif")
#: A chunk name, as a regular expression without anchors or groups.
CHUNK_PATTERN = "_".join([f"{_NUMBER}-{_NUMBER}"] * 3) + r"(?:\.tiff?)?"
_CHUNK_NAME = re.compile(CHUNK_PATTERN)
_NUMBERS = re.compile(_NUMBER)


@dataclass(frozen=True)
class ChunkName:
    """The bounding box a chunk file name spells: ends exclusive, in voxels."""

    x0: int
    x1: int
    y0: int
    y1: int
    z0: int
    z1: int

    @classmethod
    def parse(cls, name: str) -> ChunkName | None:
        """Parse ``x0-x1_y0-y1_z0-z1`` (optionally ``.tiff``/``.tif``); None if not a chunk name.

        An empty or inverted box is not a chunk name either.
        """
        if _CHUNK_NAME.fullmatch(name) is None:
            return None
        x0, x1, y0, y1, z0, z1 = (int(n) for n in _NUMBERS.findall(name))
        if x1 <= x0 or y1 <= y0 or z1 <= z0:
            return None
        return cls(x0, x1, y0, y1, z0, z1)

    @property
    def stem(self) -> str:
        """The file name without extension."""
        return f"{self.x0}-{self.x1}_{self.y0}-{self.y1}_{self.z0}-{self.z1}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """The chunk's (z, y, x) extent, the order a TIFF stack decodes to."""
        return (self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0)
