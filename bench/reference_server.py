"""The original service's method, kept to measure this server against (not part of the package).

A FastAPI route reading the whole TIFF with ``tifffile.imread`` per request and answering its
bytes, behind FastAPI's ``GZipMiddleware`` at its default settings (it compresses when the
client accepts gzip). Run it as the original ran, with uvicorn and two workers:

    NEUROTRALE_REFERENCE_ROOT=DATA python -m uvicorn --app-dir bench reference_server:app \
        --workers 2 --host 127.0.0.1 --port 8001

Needs the ``bench`` extra (``pip install .[bench]``: fastapi, uvicorn).
"""

from __future__ import annotations

import os

import tifffile
from fastapi import FastAPI, Response
from fastapi.middleware.gzip import GZipMiddleware

ROOT = os.environ.get("NEUROTRALE_REFERENCE_ROOT", ".")

app = FastAPI()
app.add_middleware(GZipMiddleware)


@app.get("/{dataset}/{key}/{chunk}")
def chunk(dataset: str, key: str, chunk: str) -> Response:
    """The chunk's voxels as the TIFF stores them: ``tifffile.imread(path).tobytes()``."""
    body = tifffile.imread(os.path.join(ROOT, dataset, key, chunk + ".tiff")).tobytes()
    return Response(body, media_type="application/octet-stream")
