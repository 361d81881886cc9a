"""matplotlib's pyplot on the headless backend: every plot of a run, an experiment or a benchmark is a file."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

__all__ = ["plt"]
