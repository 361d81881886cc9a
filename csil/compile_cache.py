"""XLA's persistent compilation cache, under the csil cache directory.

Every process that jits (the learner, env actors, rollout workers, the local base policy's server) compiles the
same programs again after a restart: ``--resume``, a component restarted after a fault, the next run of a
``csil-experiment`` grid. Compiling the updates takes tens of seconds on a CPU core and minutes for the
paper-size image learner; loading them from this cache takes milliseconds. Programs that compile in under a
second are not stored. ``CSIL_COMPILE_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import jax

from csil.config import cache_dir

MAX_BYTES = 2 * 1024**3  # least recently used entries are dropped beyond this


@functools.cache  # once per process: every jitting component calls it on construction
def enable() -> None:
    """Point JAX at ``<cache>/xla`` (a no-op with ``CSIL_COMPILE_CACHE=0``)."""
    if os.environ.get("CSIL_COMPILE_CACHE", "1") == "0":
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
