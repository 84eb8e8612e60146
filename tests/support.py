"""Helpers for tests: small precomputed-tif datasets written from arrays, and raw HTTP."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import tifffile


def write_info(
    dataset: Path,
    size: tuple[int, int, int],
    dtype: str = "uint16",
    channels: int = 1,
    chunk: tuple[int, int, int] = (64, 64, 64),
    keys: tuple[str, ...] = ("1_1_1",),
) -> None:
    """Write an ``info`` file like precomputed-tif's for a volume of ``size`` (x, y, z)."""
    dataset.mkdir(parents=True, exist_ok=True)
    scales = [
        {
            "chunk_sizes": [list(chunk)],
            "encoding": "raw",
            "key": key,
            "resolution": [1800, 1800, 2000],
            "size": list(size),
            "voxel_offset": [0, 0, 0],
        }
        for key in keys
    ]
    info = {
        "data_type": dtype,
        "mesh": "mesh",
        "num_channels": channels,
        "scales": scales,
        "type": "image",
    }
    (dataset / "info").write_text(json.dumps(info))


def write_chunk(
    dataset: Path,
    key: str,
    box: tuple[int, int, int, int, int, int],
    array: Any,
    suffix: str = ".tiff",
    **imwrite: Any,
) -> Path:
    """Write ``array`` as the chunk file of ``box`` = (x0, x1, y0, y1, z0, z1)."""
    x0, x1, y0, y1, z0, z1 = box
    directory = dataset / key
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}{suffix}"
    imwrite.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, array, **imwrite)
    return path


def header(response: Any, name: str) -> str | None:
    """The first value of response header ``name``, or None."""
    values = response.headers.getRawHeaders(name)
    return None if not values else values[0]


def raw_of(volume_czyx: Any) -> bytes:
    """What the server must send for a (c, z, y, x) array: little-endian, x fastest."""
    array = np.asarray(volume_czyx)
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()


def raw_http(port: int | str, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` as is to 127.0.0.1:``port`` (or to the unix socket at the path
    ``port``) and read the answer until the server closes.

    Blocking: call it in a thread when the server runs in this process's reactor.
    """
    if isinstance(port, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(port)
    else:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with sock:
        sock.sendall(request)
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


async def fetch_raw(url: str, headers: dict[str, str], method: bytes = b"GET") -> tuple[Any, bytes]:
    """GET ``url`` with Twisted's plain ``Agent``: unlike treq it sends ``Accept-Encoding``
    exactly as given and hands back the body as it came off the wire."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    agent = Agent(reactor)
    response = await agent.request(
        method, url.encode(), Headers({k: [v] for k, v in headers.items()})
    )
    return response, await readBody(response)


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (from :func:`raw_http`)."""
    return int(answer.split(b" ", 2)[1])


def headers_of(answer: bytes) -> dict[str, list[str]]:
    """The headers of a raw HTTP answer, by lower-case name, each with its values in order."""
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    headers: dict[str, list[str]] = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return headers
