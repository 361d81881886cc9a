"""Checkpoints of a pytree plus a small JSON record, keyed by names and written atomically (orbax).

Every leaf is stored under its path name (``jax.tree_util.keystr``: ``.policy['params']['Dense_0']['kernel']``),
so a checkpoint written before a field was added to a state still restores: leaves the checkpoint lacks keep the
template's (freshly initialised) value and are named in a log line; leaves it has that the template lacks are
ignored. A checkpoint is written into ``<path>.partial`` and renamed when complete, so a torn one is never read
(and a failed write, e.g. a full disk, leaves the previous checkpoint in place).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

PyTree = Any


def _named_leaves(tree: PyTree) -> tuple[dict[str, Any], Any, list[str]]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    return dict(zip(names, (leaf for _, leaf in leaves))), treedef, names


def save_checkpoint(path: str | Path, tree: PyTree, record: dict, arrays: dict[str, np.ndarray] | None = None
                    ) -> Path:
    """Write ``tree`` (host copies of its leaves), ``record`` and named ``arrays`` beside them (``read_arrays``;
    e.g. the device replay's transitions) to ``path``, replacing what was there only once all are complete."""
    path = Path(path)
    named, _, _ = _named_leaves(jax.device_get(tree))
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(partial / "tree", {name: np.asarray(leaf) for name, leaf in named.items()})
            if arrays:
                checkpointer.save(partial / "arrays", {name: np.asarray(a) for name, a in arrays.items()})
        (partial / "record.json").write_text(json.dumps(record))
    except (OSError, ValueError) as e:  # tensorstore reports a full disk as ValueError(RESOURCE_EXHAUSTED ...)
        shutil.rmtree(partial, ignore_errors=True)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "ENOSPC" in str(e)
        if not isinstance(e, OSError) and not full:
            raise
        raise OSError(errno.ENOSPC if full else e.errno,
                      f"writing checkpoint {path} failed ({'the disk is full' if full else e.strerror or e}); the "
                      "previous checkpoint is kept") from e
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


def restore_checkpoint(path: str | Path, template: PyTree) -> tuple[PyTree, dict]:
    """The tree saved at ``path`` shaped like ``template`` (see the module docstring), and its record."""
    path = Path(path)
    if not (path / "record.json").exists():
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    saved = _restore_named(path / "tree")
    wanted, treedef, names = _named_leaves(template)
    missing = [n for n in names if n not in saved]
    if missing:
        log.warning("checkpoint %s lacks %d leaves (kept as initialised): %s", path, len(missing),
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    for name in names:
        if name in saved and np.shape(saved[name]) != np.shape(wanted[name]):
            raise ValueError(f"checkpoint {path}: {name} has shape {np.shape(saved[name])}, the run expects "
                             f"{np.shape(wanted[name])} (a different network size?)")
    return jax.tree_util.tree_unflatten(treedef, [saved.get(n, wanted[n]) for n in names]), json.loads(
        (path / "record.json").read_text())


def read_arrays(path: str | Path) -> dict[str, np.ndarray] | None:
    """The ``arrays`` a checkpoint was saved with, or None if it has none."""
    return _restore_named(Path(path) / "arrays") if (Path(path) / "arrays").exists() else None


def _restore_named(directory: Path) -> dict[str, np.ndarray]:
    """A flat dict of named arrays as orbax stored it, shapes and dtypes from its own metadata."""
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(directory)
        meta = getattr(meta, "item_metadata", meta)  # orbax versions differ in how they wrap the tree
        stored = getattr(meta, "tree", meta)
        return checkpointer.restore(directory, {n: jax.ShapeDtypeStruct(m.shape, m.dtype) for n, m in stored.items()})


def numbered_checkpoints(directory: str | Path) -> list[Path]:
    """The complete checkpoints ``<directory>/<number>``, oldest first."""
    found = [p for p in Path(directory).glob("[0-9]*") if p.name.isdigit() and (p / "record.json").exists()]
    return sorted(found, key=lambda p: int(p.name))
