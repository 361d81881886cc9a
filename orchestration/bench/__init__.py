"""Benchmarks behind ``csil-bench`` and ``csil-scale``: each returns one record with a ``ratio`` against a
baseline measured in the same run."""
