"""The project's own commands besides the server: ``neurotrale-ingest`` (TIFF planes into a
precomputed pyramid) and ``neurotrale-demo`` (a small dataset to explore). Use the core alone."""
