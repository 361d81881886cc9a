"""How the base policy's action and the small policy's action become the executed action."""

from __future__ import annotations

import numpy as np

ACTION_MODES = ("ensemble", "residual")


def combine_actions(base: np.ndarray, small: np.ndarray, mode: str) -> np.ndarray:
    """ensemble: the mean of the two (the paper's default); residual: their sum, clipped to the action box.

    Replay stores ``small`` (a_pi) itself, not the result: the coherent reward and the critic are defined on
    the small policy's own actions.
    """
    if mode == "ensemble":
        return 0.5 * (base + small)
    if mode == "residual":
        return np.clip(base + small, -1.0, 1.0)
    raise ValueError(f"unknown action mode {mode!r}; choose one of {ACTION_MODES}")
