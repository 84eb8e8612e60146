"""``neurotrale-ingest``: turn a stack of TIFF planes into a dataset in the precomputed-tif
layout the server reads.

``neurotrale-ingest --source 'planes/*.tif' --dest /data/brain1`` (or
``python -m neurotrale_twisted.tools.ingest ...``) reads the planes in natural sorted order
(``z2.tif`` before ``z10.tif``; 2-D planes, or 3-D stacks whose pages are planes), and writes
``/data/brain1/info`` and one directory of ``x0-x1_y0-y1_z0-z1.tiff`` chunks per scale
(``1_1_1``, ``2_2_2``, ``4_4_4``, ...), each scale half the size of the one before: the mean
of each 2x2x2 block for images (rounded half up), the most frequent label for segmentations
(ties go to the smallest label). At an odd edge a block holds fewer voxels; the mean and the
mode are taken over those it holds.

Memory: the volume is streamed, never held. Each scale keeps one chunk row in z
(``chunk_z`` planes of that scale) and at most one plane waiting for its pair, so the buffers
hold about ``4/3 * chunk_z`` planes of the first scale (``chunk_z * Y * X * itemsize * 4/3``
bytes); on top of that, each of ``--jobs`` writer processes has at most two strips of chunks
(``chunk_z * chunk_y * X`` voxels each) in flight. A 10000 x 10000 uint16 stack with the
default 64-voxel chunks needs about 17 GB of buffers, whatever its depth; a 1024 x 1024 one
about 180 MB.

Every chunk file is written to a temporary dot-file beside it and renamed into place, so a
chunk file is either complete or absent; ``--resume`` re-reads the planes (the coarser scales
are computed from them) and writes only the chunks that are missing or unreadable.

The modules, in the order the data flows:

- :mod:`.source`: finding the TIFF files and checking that their planes make one volume;
- :mod:`.layout`: the precomputed layout: scale keys and sizes, ``info``, chunk file names;
- :mod:`.downsample`: halving a volume (block mean, block mode);
- :mod:`.chunkfiles`: writing and checking chunk files, a strip of them at a time;
- :mod:`.pyramid`: streaming planes through every scale;
- :mod:`.settings`: the command line's values checked against the source and destination;
- :mod:`.run`: one ingest: the readers, the writer processes, the progress bar;
- :mod:`.cli`: the ``neurotrale-ingest`` command and its exit status.
"""
