"""The process layer: the command line, the service ``twistd neurotrale`` runs, and the pool of
worker processes behind ``--workers``. Builds on the web layer and the core."""
