"""Device mesh, multi-host start-up and sharding of parameters and batches.

Mesh axes are always ``("data", "fsdp", "tensor", "sequence")`` (:data:`MESH_AXES`):

* ``data``     pure data parallelism (parameters replicated);
* ``fsdp``     data parallelism with parameters (and optimizer state) sharded: every parameter
               gets its largest unannotated dimension divisible by the axis size split over
               ``"fsdp"`` (ZeRO-3 / FSDP style; XLA inserts the all-gathers);
* ``tensor``   tensor parallelism, taken from the layers' own partition metadata (head axes ->
               ``"tensor"``, see :data:`attnjax.layers.common.AXIS_RULES`);
* ``sequence`` context parallelism (language models only): the token axis of the batch is
               sharded over ``"sequence"`` and the attention layers run
               :func:`attnjax.parallel.context_parallel_attention` over it; other model
               kinds raise ``NotImplementedError`` (:func:`check_sequence_parallel`).

The batch dimension of every input is sharded over ``("data", "fsdp")`` (:data:`BATCH_AXES`),
and with context parallelism the token dimension over ``"sequence"`` (:data:`SEQUENCE_AXIS`).
In a multi-process run each process loads the block of batch rows its devices hold
(:func:`process_row_blocks`) and :func:`global_batch` assembles the global arrays.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"
# Non-axis keys of the mesh config (the sequence_* keys configure context parallelism).
MESH_OPTIONS = ("num_devices", "fsdp_min_size", "sequence_strategy", "sequence_load_balance")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Multi-host
# ---------------------------------------------------------------------------------------------

def _cluster_env_detected() -> str | None:
  """Name of the multi-process environment the variables describe, or None."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "multi-host Cloud TPU"
  return None


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Start ``jax.distributed`` when running on several processes.

  ``mode``: ``"auto"`` initializes when the environment says this is one process of many
  (``JAX_COORDINATOR_ADDRESS`` [with ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` or cluster
  auto-detection], a SLURM job with several tasks, Open MPI, or a multi-host Cloud TPU slice);
  ``"on"`` always calls ``jax.distributed.initialize()`` (which auto-detects the cluster);
  ``"off"`` never does. Must run before any other JAX call. Returns whether it initialized.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"multihost={mode!r} is not supported; allowed values: 'auto', 'on', 'off'")
  if mode == "off":
    return False
  reason = _cluster_env_detected() if mode == "auto" else "multihost=on"
  if reason is None:
    return False
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  log.info("initializing jax.distributed (%s) %s", reason, kwargs)
  jax.distributed.initialize(**kwargs)
  return True


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------

def resolve_mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> dict[str, int]:
  """Axis sizes from the config (``-1`` = fill with the remaining devices).

  Raises ValueError when an axis is unknown, a size is invalid, more than one axis is ``-1``,
  or the product of the sizes is not ``num_devices``."""
  extra = sorted(k for k in mesh_cfg.keys() if k not in MESH_AXES + MESH_OPTIONS)
  if extra:
    raise ValueError(f"unknown mesh axes {extra}; the mesh axes are {MESH_AXES}")
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ValueError(f"mesh axis sizes must be >= 1 or -1 (fill), got {bad}")
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1 (fill), got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide the "
          f"{num_devices} devices, so axis {fill[0]!r}=-1 cannot be filled")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
        f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} devices are "
        f"used (jax.device_count()={jax.device_count()}); the product of the mesh axis sizes "
        f"must equal the device count (set one axis to -1 to fill)")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, Any]) -> jax.sharding.Mesh:
  """The ``("data", "fsdp", "tensor", "sequence")`` mesh described by ``mesh_cfg``.

  ``mesh_cfg.num_devices`` (default -1 = all) uses only the first N devices (single process
  only; e.g. a 1-device run on a host with simulated devices)."""
  n = int(mesh_cfg.get("num_devices", -1))
  devices = jax.devices()
  if n != -1:
    if n < 1 or n > len(devices):
      raise ValueError(f"mesh.num_devices={n} but {len(devices)} devices are available")
    if n != len(devices) and jax.process_count() > 1:
      raise ValueError("mesh.num_devices must be -1 (all devices) in a multi-process run")
    devices = devices[:n]
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  # non-TPU topologies: plain reshape
    dev_array = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_sequence_parallel(mesh: jax.sharding.Mesh, kind: str = "lm") -> int:
  """The size of the ``sequence`` axis, after checking that ``kind`` supports it.

  Language models (``kind="lm"``) run context-parallel attention over ``sequence``
  (:meth:`attnjax.models.DecoderLM.set_context_parallel`). ViTs have no context-parallel path
  (their attentions are bidirectional over a short patch sequence, several are not global
  attention, and the patch/class-token layout is built inside the model), so a ``sequence``
  axis > 1 raises ``NotImplementedError`` rather than silently replicating work."""
  n = int(mesh.shape["sequence"])
  if n > 1 and kind != "lm":
    raise NotImplementedError(
        f"mesh axis 'sequence'={n}: sequence (context) parallelism is only implemented for "
        f"language models (model.kind='lm'), not model.kind={kind!r}: the ViT builds its patch "
        "sequence inside the model and its attention layers have no context-parallel path. Use "
        "mesh.sequence=1 and put the devices on 'data', 'fsdp' or 'tensor'.")
  return n


def batch_axes_size(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, sequence: bool = False) -> NamedSharding:
  """Leading (batch) dimension over ``("data", "fsdp")``; with ``sequence`` the second (token)
  dimension of arrays with ``ndim >= 2`` over ``"sequence"``; the rest replicated."""
  if sequence and ndim >= 2:
    return NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS, *([None] * (ndim - 2))))
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class RowBlocks:
  """How the processes of a multi-process run split the batch rows (dimension 0) among them.

  The rows ``[0, B)`` of every global batch are cut into ``num_blocks`` equal contiguous blocks;
  process ``p`` loads block ``block_of[p]`` (``B / num_blocks`` rows: data shard
  ``block_of[p]`` of ``num_blocks``). Processes whose devices hold the same rows (a ``tensor``
  or ``sequence`` axis across processes) share a block and load identical rows. On one process
  ``num_blocks == 1``."""
  block_of: Mapping[int, int]
  num_blocks: int


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _ranges(rows: list[int]) -> str:
  """``[0, 1, 2, 5]`` -> ``"[0:3) [5:6)"`` (batch shards as half-open ranges)."""
  out, start = [], None
  for i, r in enumerate(rows):
    if start is None:
      start = r
    if i + 1 == len(rows) or rows[i + 1] != r + 1:
      out.append(f"[{start}:{r + 1})")
      start = None
  return " ".join(out)


def process_row_blocks(sharding: NamedSharding,
                       process_of: Callable[[Any], int] | Mapping[Any, int] | None = None
                       ) -> RowBlocks:
  """The row block each process loads, for batches sharded by ``sharding`` (dimension 0 over
  the batch axes, see :func:`batch_sharding`).

  Pure function of the mesh, the sharding and the device -> process assignment
  (``process_of``: a mapping or callable; default ``device.process_index``), so it can be
  checked with simulated devices and a made-up assignment. Rows are counted in batch shards
  (``data * fsdp`` of them); every process must hold one contiguous range of them, and two
  processes must hold either the same range or disjoint ones of the same length (then each
  process can load a distinct ``B / num_blocks`` slice, and processes holding the same rows load
  the same slice). Raises ValueError naming the ``mesh.*`` config keys and the layout otherwise
  (e.g. devices ordered so that a process holds batch shards 0 and 2 but not 1)."""
  if process_of is None:
    process_of = lambda d: int(d.process_index)  # noqa: E731
  elif not callable(process_of):
    process_of = process_of.__getitem__
  mesh = sharding.mesh
  spec = tuple(sharding.spec) or (None,)
  # one index per shard along each dimension: dimension 0 then gives the batch shard
  counts = tuple(int(np.prod([mesh.shape[a] for a in _axis_names(e)])) for e in spec)
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map(counts).items():
    r = index[0]
    rows.setdefault(int(process_of(device)), set()).update(
        range(r.start or 0, counts[0] if r.stop is None else r.stop))
  layout = "; ".join(f"process {p}: batch shards {_ranges(sorted(rows[p]))}"
                     for p in sorted(rows))
  blocks: dict[tuple[int, int], list[int]] = {}
  for p in sorted(rows):
    r = sorted(rows[p])
    if r[-1] - r[0] + 1 != len(r):
      blocks = {}
      break
    blocks.setdefault((r[0], r[-1] + 1), []).append(p)
  spans = sorted(blocks)
  ok = bool(spans) and all(b[1] - b[0] == spans[0][1] - spans[0][0] for b in spans) and all(
      a[1] <= b[0] for a, b in zip(spans, spans[1:]))
  if not ok:
    sizes = ", ".join(f"mesh.{a}={mesh.shape[a]}" for a in mesh.axis_names)
    raise ValueError(
        f"mesh {sizes} over {len(rows)} processes: the processes do not split the batch "
        f"(the {counts[0]} data*fsdp shards of dimension 0) into equal contiguous blocks, so "
        f"each process cannot load its own slice of the batch ({layout}). Every process's "
        f"devices must hold one contiguous range of batch shards, the same as or disjoint from "
        f"every other process's. With devices ordered by process this holds when tensor*"
        f"sequence divides, or is a multiple of, the devices per process: change mesh.data, "
        f"mesh.fsdp, mesh.tensor or mesh.sequence.")
  block_of = {p: i for i, span in enumerate(spans) for p in blocks[span]}
  return RowBlocks(block_of=block_of, num_blocks=len(spans))


def global_batch(mesh: jax.sharding.Mesh, local_batch: Mapping[str, np.ndarray],
                 sequence: bool = False, num_blocks: int | None = None) -> dict:
  """Host-local numpy batch -> global ``jax.Array`` sharded over the batch axes.

  ``local_batch`` holds this process's row block (:func:`process_row_blocks`): ``B /
  num_blocks`` rows with every token, identical on processes that share the block; the global
  shape is given explicitly (``num_blocks`` times the local rows), never inferred from the
  process count. ``num_blocks``: default computed from ``mesh``. ``sequence``: also shard the
  token axis (dimension 1) over the ``"sequence"`` mesh axis (context parallelism); each device
  then takes its token slice of the process's rows."""
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    sharding = batch_sharding(mesh, v.ndim, sequence)
    if num_blocks is None:
      num_blocks = process_row_blocks(sharding).num_blocks
    global_shape = (v.shape[0] * num_blocks,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


# ---------------------------------------------------------------------------------------------
# Parameter shardings
# ---------------------------------------------------------------------------------------------

def _spec_for(shape, spec: P, mesh: jax.sharding.Mesh, fsdp_min_size: int, name: str) -> P:
  axes = list(tuple(spec)) + [None] * (len(shape) - len(tuple(spec)))
  if len(axes) != len(shape):
    raise ValueError(f"parameter {name}: partition spec {spec} has more entries than its "
                     f"shape {tuple(shape)}")
  for i, a in enumerate(axes):
    names = a if isinstance(a, tuple) else ((a,) if a is not None else ())
    for n in names:
      if n not in mesh.axis_names:
        raise ValueError(f"parameter {name}: partition spec {spec} names mesh axis {n!r}, "
                         f"which is not one of {mesh.axis_names}")
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    if size > 1 and shape[i] % size:
      log.warning("parameter %s: dimension %d (size %d) is not divisible by mesh axes %s "
                  "(size %d); that dimension is replicated instead", name, i, shape[i], names,
                  size)
      axes[i] = None
  f = mesh.shape["fsdp"]
  if f > 1 and int(np.prod(shape)) >= fsdp_min_size:
    free = [i for i, a in enumerate(axes) if a is None and shape[i] % f == 0]
    if free:
      i = max(free, key=lambda j: (shape[j], -j))
      axes[i] = "fsdp"
  return P(*axes)


def param_shardings(abstract_state, mesh: jax.sharding.Mesh, fsdp_min_size: int = 2 ** 14):
  """``NamedSharding`` tree for an (abstract) NNX state: the layers' partition metadata
  (``nnx.get_partition_spec``), dimensions not divisible by their mesh axes replicated (with a
  warning), plus FSDP sharding of the largest free dimension for parameters with at least
  ``fsdp_min_size`` elements. Leaves without metadata are replicated (+ FSDP)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  specs = nnx.get_partition_spec(abstract_state)
  paths_specs, treedef = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree.leaves(abstract_state)
  if len(shapes) != len(paths_specs):
    raise ValueError("internal error: partition specs and state leaves do not line up")
  out = []
  for (path, spec), leaf in zip(paths_specs, shapes):
    name = jax.tree_util.keystr(path)
    spec = spec if isinstance(spec, P) else P()
    out.append(NamedSharding(mesh, _spec_for(leaf.shape, spec, mesh, fsdp_min_size, name)))
  return jax.tree_util.tree_unflatten(treedef, out)


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + (
      f" over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s), "
      f"{jax.process_count()} process(es)")
