"""Dataset readers and converters used by the ``data_prep/`` scripts and the evaluation.

* :mod:`.issues` — :class:`DataFormatError` and the skip-with-warning log (``--strict``).
* :mod:`.readers` — streaming JSON-lines / TSV / parquet / ``datasets``-folder readers.
* :mod:`.collection` — the converted shape: corpus parquet on disk, judged queries in memory.
* :mod:`.beir`, :mod:`.msmarco`, :mod:`.generic`, :mod:`.titles` — one converter per input format.
* :mod:`.negatives` — hard negatives (BM25, dense sentence-transformers, given).
* :mod:`.outputs` — output schemas, writers and the atomic output folder.
* :mod:`.build` — :func:`build_pairs`, the whole ``data_prep/build_pairs.py`` run.
"""
