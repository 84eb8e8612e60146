"""neurotrale-twisted: the NeuroTrALE precomputed image and annotation server.

Run it with ``twistd -n neurotrale --path /data``; see README.md.
"""

__version__ = "0.1.0"
