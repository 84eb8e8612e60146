"""Image chunks: their names (:mod:`.names`), the ``info`` of a dataset (:mod:`.info`), TIFF
decoding into the precomputed "raw" encoding (:mod:`.tiff`), and the source that answers a
chunk request from those (:mod:`.source`), reading files through :mod:`..imagery`."""
