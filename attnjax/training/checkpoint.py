"""Orbax checkpoints of the whole training state, including the data-iterator position.

One checkpoint ``workdir/checkpoints/<step>/`` holds three items:

* ``state``: the train-state pytree (parameters, other model variables, optimizer state,
  step, base RNG key) saved with ``ocp.args.StandardSave`` (sharded arrays, async);
* ``data``:  the grain iterator state (``grain.checkpoint.CheckpointSave`` /
  ``CheckpointRestore``, one JSON file per process), written when :meth:`save` is called, so it
  matches the step exactly even when the arrays are written in the background;
* ``meta``:  JSON (step, model kind, parameter count, config hash).

Orbax writes into a temporary directory and renames it when complete, so a process killed while
saving never leaves a half-written checkpoint among the finalized ones. Restoring checks the
saved tree against the abstract target first (missing / unexpected / mismatched leaves are
listed) and wraps any read error in :class:`CheckpointError`; nothing is deleted or overwritten
on failure.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

try:  # grain registers its orbax handlers only when orbax is importable
  from grain.checkpoint import CheckpointHandler as GrainHandler
  from grain.checkpoint import CheckpointRestore as GrainRestore
  from grain.checkpoint import CheckpointSave as GrainSave
except ImportError:  # pragma: no cover
  GrainHandler = GrainRestore = GrainSave = None

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (corrupt, incompatible, or refused to be overwritten)."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree, is_leaf=None) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _is_array_metadata(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def compare_trees(saved_meta, target) -> list[str]:
  """Human-readable differences between a checkpoint's tree metadata and an abstract target."""
  saved = _flat(saved_meta, is_leaf=_is_array_metadata)
  want = _flat(target)
  problems = []
  order = lambda k: (k.startswith("opt_state"), k)  # parameters first  # noqa: E731
  for k in sorted(set(want) - set(saved), key=order):
    problems.append(f"missing in checkpoint: {k} {tuple(want[k].shape)}")
  for k in sorted(set(saved) - set(want), key=order):
    problems.append(f"not in the model/optimizer: {k} {tuple(getattr(saved[k], 'shape', ()))}")
  for k in sorted(set(saved) & set(want), key=order):
    s, w = saved[k], want[k]
    if tuple(getattr(s, "shape", ())) != tuple(w.shape):
      problems.append(f"shape mismatch: {k} checkpoint {tuple(s.shape)} vs expected "
                      f"{tuple(w.shape)}")
  return problems


def _root_cause(e: BaseException, limit: int = 300) -> str:
  """First line of the innermost exception of the chain (orbax/tensorstore errors are long)."""
  seen = set()
  while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  msg = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {msg[:limit]}"


class Checkpointer:
  """``ocp.CheckpointManager`` over ``directory`` keeping the last ``max_to_keep`` steps."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    if GrainSave is None:
      raise ImportError("grain with orbax support is required for data-iterator checkpoints")
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": GrainHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = True) -> bool:
    """Start saving ``state`` (async where supported) and the iterator position now."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=GrainSave(data_iterator),
                              meta=ocp.args.JsonSave(dict(meta, step=int(step))))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, step: int, abstract_state, data_iterator):
    """``(state, meta)`` of ``step`` with ``data_iterator`` moved to the saved position.

    ``abstract_state``: ``jax.ShapeDtypeStruct`` leaves (with shardings) of the expected state.
    Raises :class:`CheckpointError` naming the directory and the problem."""
    path = os.path.join(self.directory, str(step))
    if step not in self.all_steps():
      raise CheckpointError(f"no finalized checkpoint for step {step} in {self.directory} "
                            f"(available: {self.all_steps()})")
    hint = (f"The checkpoint was left untouched. Available steps: {self.all_steps()}; resume an "
            f"earlier one with --resume_step=N, or start a fresh run in another --workdir.")
    try:
      meta = self.manager.item_metadata(step)
      saved_tree = meta["state"].tree if meta["state"] is not None else None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {path} is unreadable, it is corrupt or incomplete "
                            f"({_root_cause(e)}). {hint}") from e
    if saved_tree is None:
      raise CheckpointError(f"checkpoint {path} has no readable 'state' item (corrupt or "
                            f"incomplete). {hint}")
    problems = compare_trees(saved_tree, abstract_state)
    if problems:
      shown = "\n  ".join(problems[:20])
      more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
      raise CheckpointError(f"checkpoint {path} does not match this model/optimizer config "
                            f"({len(problems)} differences):\n  {shown}{more}\n{hint}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=GrainRestore(data_iterator),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {path} could not be read, it is corrupt or incomplete "
                            f"({_root_cause(e)}). {hint}") from e
    return out["state"], dict(out["meta"] or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
