"""Registers ``twistd neurotrale``: its command line is :mod:`neurotrale_twisted.process.command`,
the service it builds :mod:`neurotrale_twisted.process.service` (``command.makeService(options)``
hands it the reactor twistd installed)."""

from twisted.application.service import ServiceMaker

neurotrale = ServiceMaker(
    "NeuroTrALE precomputed server",
    "neurotrale_twisted.process.command",
    "Serve Neuroglancer precomputed chunks from TIFF files and NeuroTrALE annotations.",
    "neurotrale",
)
