"""neurotrale-twisted: the NeuroTrALE precomputed image and annotation server.

Run it with ``neurotrale --path /data`` (or ``twistd -n neurotrale --path /data``); see
README.md.
"""

from importlib import metadata


def project_version() -> str:
    """This project's version, as installed (``0`` when run from a tree never installed)."""
    try:
        return metadata.version("neurotrale-twisted")
    except metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
        return "0"


__version__ = project_version()
