"""Dataset readers and converters used by the ``data_prep/`` scripts and the evaluation."""
