"""The naive baseline: ``tifffile.imread`` per request on the reactor's thread pool.

What a straightforward port of the old service does, kept to measure our chunk route against
(``python bench/naive_server.py DATA_ROOT PORT``). Not part of the package.
"""

from __future__ import annotations

import sys

import numpy as np
import tifffile
from klein import Klein
from twisted.internet.threads import deferToThread
from twisted.web.iweb import IRequest

app = Klein()
ROOT = sys.argv[1]


@app.route("/<path:dataset>/<key>/<chunk>")
async def chunk(request: IRequest, dataset: str, key: str, chunk: str) -> bytes:
    """Read the whole TIFF with tifffile and send its bytes, x fastest, little-endian."""

    def read() -> bytes:
        array = tifffile.imread(f"{ROOT}/{dataset}/{key}/{chunk}.tiff")
        return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()

    body: bytes = await deferToThread(read)
    request.setHeader(b"content-type", b"application/octet-stream")
    return body


if __name__ == "__main__":
    app.run("127.0.0.1", int(sys.argv[2]), logFile=open("/dev/null", "w"))  # noqa: SIM115
