"""Train a small LM or ViT from an ml_collections config on a device mesh.

    python experiments/train.py --config configs/lm_tiny.py [--config.key=value ...] \
        [--workdir DIR] [--resume [--resume_step N]] [--noprogress]

* ``--config.a.b=value`` overrides any config entry (``--config.optim.lr=1e-3``,
  ``--config.mesh.fsdp=4``, ``--config.model.attention=gqa``); an unknown key is an error that
  lists the valid keys at that level.
* ``--workdir``: where checkpoints, ``metrics.jsonl``, TensorBoard events (``tb/``),
  ``curves.png``, ``config.json`` and ``summary.json`` go (default
  ``runs/<config>-<date-time>``). A workdir that already holds checkpoints is only used with
  ``--resume`` (never overwritten).
* ``--resume``: continue from the latest checkpoint (or ``--resume_step``), including the data
  position and RNG: the final parameters equal those of an uninterrupted run.

Devices. The mesh is ``cfg.mesh`` over axes ``data, fsdp, tensor, sequence`` (``-1`` fills);
the same command runs on one CPU, on simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on GPU/TPU hosts. For LMs,
``--config.mesh.sequence=N`` (N > 1) is context parallelism: the token axis of every batch is
permuted into a load-balancing layout (``mesh.sequence_load_balance``, default ``zigzag``) and
sharded over ``sequence``, and every attention layer runs
``attnjax.parallel.context_parallel_attention`` (``mesh.sequence_strategy``: ``ring`` default,
``all_gather``, ``ulysses``). ViTs raise ``NotImplementedError`` for ``sequence > 1``.

Multi-host. With ``cfg.distributed="auto"`` (default) ``jax.distributed.initialize()`` is
called when the environment describes a multi-process job: ``JAX_COORDINATOR_ADDRESS`` (plus
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or cluster auto-detection), a SLURM job with
several tasks, Open MPI, or a multi-host Cloud TPU slice. Start the same command on every host;
``--config.distributed=on`` forces initialization (jax auto-detects the cluster), ``off``
disables it. Each process reads the block of batch rows its devices hold (data shard ``block``
of ``num_blocks``, see ``attnjax.training.mesh.process_row_blocks``: processes split along
``data``/``fsdp`` read disjoint blocks, processes sharing rows through a ``tensor`` or
``sequence`` axis read the same block; a mesh whose process layout allows neither is rejected)
and writes its part of every checkpoint into the shared ``--workdir``.
"""

from __future__ import annotations

import datetime
import logging
import os
import runpy
import sys

if __package__ in (None, ""):  # `python experiments/train.py` from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402


class ConfigKeyError(ValueError):
  """An override names a config key that does not exist."""


def _load_config_file(path: str):
  spec, _, arg = path.partition(":")
  if not os.path.exists(spec):
    raise FileNotFoundError(f"--config file {spec!r} does not exist")
  mod = runpy.run_path(spec)
  if "get_config" not in mod:
    raise ValueError(f"--config file {spec!r} has no get_config()")
  return mod["get_config"](arg) if arg else mod["get_config"]()


def _config_path(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_overrides(cfg, argv):
  """Raise :class:`ConfigKeyError` naming the first ``--config.x.y`` override whose key path is
  not in ``cfg``, with the valid keys at that level (ml_collections alone says ``KeyError 'y'``).
  """
  for a in argv:
    if not a.startswith("--config.") and not a.startswith("--noconfig."):
      continue
    key = a.split("=", 1)[0].split(".", 1)[1]
    node, walked = cfg, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = "config" if not walked else "config." + ".".join(walked)
        valid = ", ".join(sorted(keys)) if keys else f"none ({where} is not a group)"
        raise ConfigKeyError(f"unknown config key {key!r} in {a!r}: {where} has no key "
                             f"{part!r}; valid keys there: {valid}")
      node, walked = node[part], walked + [part]


def parse_args(argv):
  """``(cfg, workdir, resume, resume_step, progress)`` from a command line (argv[0] = prog)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config file (get_config())",
                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
  flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir",
                    flag_values=fv)
  flags.DEFINE_integer("resume_step", None, "with --resume: the checkpoint step to resume",
                       flag_values=fv)
  flags.DEFINE_bool("progress", True, "show a tqdm progress bar", flag_values=fv)
  path = _config_path(argv[1:])
  if path is None:
    raise ValueError("--config is required, e.g. --config configs/lm_tiny.py")
  check_overrides(_load_config_file(path), argv[1:])
  try:
    fv(list(argv))
  except flags.Error as e:
    raise ValueError(f"bad command line: {e}") from e
  cfg = fv.config
  workdir = fv.workdir
  if workdir is None:
    if fv.resume:
      raise ValueError("--resume needs --workdir (the directory of the run to continue)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = os.path.join("runs", f"{cfg.get('name', 'run')}-{stamp}")
  return cfg, workdir, fv.resume, fv.resume_step, fv.progress


def main(argv=None):
  """Parse ``argv`` (default ``sys.argv``), train, and return the :class:`RunResult`."""
  argv = list(sys.argv if argv is None else argv)
  cfg, workdir, resume, resume_step, progress = parse_args(argv)
  from attnjax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh_lib.maybe_initialize_distributed(str(cfg.get("distributed", "auto")))
  from attnjax.training import run  # pylint: disable=import-outside-toplevel
  return run(cfg, workdir, resume=resume, resume_step=resume_step, progress=progress)


def cli(argv=None) -> int:
  """``main`` for the command line: the errors a user can fix (bad config or command line,
  missing data, a checkpoint problem, a non-finite loss) are printed without a traceback and
  give exit status 2; any other exception propagates with its traceback."""
  try:
    main(argv)
  except (ValueError, NotImplementedError, FileNotFoundError) as err:
    print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
    return 2
  except (RuntimeError, FloatingPointError) as err:
    # CheckpointError / NonFiniteLossError (the train loss became NaN or inf; the message
    # lists the likely causes). Other RuntimeErrors and FloatingPointErrors (e.g. from
    # JAX_DEBUG_NANS=True, which points at the operation) keep their traceback.
    if type(err).__name__ not in ("CheckpointError", "NonFiniteLossError"):
      raise
    print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  sys.exit(cli())
