"""Annotation files: their format, where they are, how they are read, written and kept.

An annotation file is ``{dataset}/annotations/{blockdir}/{name}.json``, a JSON array of
records. The modules, from the bottom up: :mod:`.records` (the file name rule, the record
types and their validation, a file's bytes), :mod:`.commitlog` (the commit protocol of
``docs/commit-protocol.md``: the log, publishing, versions, the same-host lock),
:mod:`.places` (walking to a dataset's block directories from the data root), :mod:`.blocks`
(a URL's block to a directory, ``block_info.csv``), :mod:`.versions` (what a read answers:
the current content and the kept versions) and :mod:`.store` (the store the web layer calls).
Import each name from the module that defines it; this package re-exports nothing.
"""
