"""Registers ``twistd neurotrale``; everything else lives in :mod:`neurotrale_twisted.service`."""

from twisted.application.service import ServiceMaker

neurotrale = ServiceMaker(
    "NeuroTrALE precomputed server",
    "neurotrale_twisted.service",
    "Serve Neuroglancer precomputed chunks from TIFF files and NeuroTrALE annotations.",
    "neurotrale",
)
