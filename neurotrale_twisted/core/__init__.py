"""The core: everything that touches the data root, and nothing of Twisted, Klein or the web.

Chunks and their TIFF files (``chunks``, read through ``imagery``), annotations and their commit
protocol (``annotations``), the data-root file layer (``rootfs``, ``paths``), errors the web
layer maps to answers (``errors``). Its functions block (they read files); the web layer runs
them on a thread pool. ``tests/test_layers.py`` keeps Twisted out of it.
"""
