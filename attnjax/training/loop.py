"""The training driver: ``run(cfg, workdir, resume=...)`` (what ``experiments/train.py`` calls).

Order of work: mesh -> datasets -> abstract model/optimizer state and its shardings ->
restore (``resume``) or jitted sharded init -> train loop (tqdm, JSONL/TensorBoard metrics,
periodic eval and checkpoints) -> final eval, plot, generated sample (LMs), ``summary.json``.

Determinism: the data order is a function of ``(seed, row block, number of row blocks)`` (each
process loads the block of batch rows its devices hold, see
:func:`attnjax.training.mesh.process_row_blocks`; one block on one process) and the iterator
position is checkpointed with the state; randomness inside a step uses
``fold_in(key(seed), step)``. A run killed at any point and resumed with ``resume=True``
therefore reaches the same parameters as an uninterrupted run (tested bit-exact on CPU). Train
metrics are averaged over windows of ``log_every`` steps ending at multiples of ``log_every``
(and at ``num_steps``); the per-step metrics of the window a checkpoint cuts are saved with it,
so a resumed run writes the same records as an uninterrupted one (with the same ``log_every``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.training import checkpoint as ckpt_lib
from attnjax.training import mesh as mesh_lib
from attnjax.training import metrics as metrics_lib
from attnjax.training import optim as optim_lib
from attnjax.training import steps as steps_lib

log = logging.getLogger("attnjax.training")

# Model config keys filled from the dataset when left as None.
_FROM_DATA = {"lm": {"vocab_size": "vocab_size", "max_len": "seq_len"},
              "vit": {"num_classes": "num_classes", "image_size": "image_shape",
                      "in_channels": "image_shape"}}
_DATA_KIND = {"lm": "text", "vit": "image"}


class NonFiniteLossError(FloatingPointError):
  """The train loss became NaN or infinite; the message lists the likely causes. Raised before
  the state is checkpointed, so the checkpoints on disk are all finite."""


@dataclasses.dataclass
class RunResult:
  """What :func:`run` returns: the summary (also in ``workdir/summary.json``), the final train
  state (sharded arrays) and the model with the final parameters."""
  summary: dict
  state: dict
  model: Any
  workdir: str


def _get(cfg, key, default=None):
  v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if v is None else v


def config_hash(cfg) -> str:
  """Hash of the entries a checkpoint depends on (unset ``model.attention_kwargs`` and ``data``
  entries ignored, so adding a None-valued key to a config does not change it)."""
  d = _to_dict({k: cfg[k] for k in ("model", "data", "optim", "seed", "batch_size") if k in cfg})
  if isinstance(d.get("data"), dict):
    d["data"] = {k: v for k, v in d["data"].items() if v is not None}
  ak = d.get("model", {}).get("attention_kwargs")
  if isinstance(ak, dict):
    d["model"] = dict(d["model"], attention_kwargs={k: v for k, v in ak.items() if v is not None})
    if not d["model"]["attention_kwargs"]:
      del d["model"]["attention_kwargs"]
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_dict(x):
  if hasattr(x, "to_dict"):
    return x.to_dict()
  if isinstance(x, dict):
    return {k: _to_dict(v) for k, v in x.items()}
  return x


# ``model.attention_kwargs`` entries of the configs, per model kind: the attention layers'
# common constructor arguments, ``name: (type, comment)``. Each is a ``None`` placeholder in the
# config (unset: not passed, see :func:`model_config`) so that it can be set on the command line
# (ml_collections overrides cannot add keys). An entry that the chosen attention does not take
# is an error naming the keys it does take (:mod:`attnjax.models.registry`).
ATTENTION_KWARGS = {
    "lm": {  # attnjax.models.LM_ATTENTIONS
        "window": (int, "sliding_window (required): W keys, query included"),
        "stride": (int, "strided_heads (required): a head sees 1/stride"),
        "local_window": (int, "strided_heads: dense band |i - j| <= this"),
        "block": (int, "strided_heads: tokens per strided shard"),
        "gate": (str, 'gated: "elementwise" (default) | "headwise"'),
        "sinks": (bool, "mha family: learned per-head sink logits"),
        "qk_norm": (bool, "mha family: normalize q and k"),
        "num_shared_heads": (int, "moh: always-on heads (default num_heads // 2)"),
        "top_k": (int, "moh: routed heads per token"),
        "kv_lora_rank": (int, "mla: latent size (default 4 * head_dim)"),
    },
    "vit": {  # attnjax.models.VIT_ATTENTIONS (square kernels / windows from the command line)
        "kernel_size": (int, "neighborhood: keys per axis (default min(7, grid), odd)"),
        "dilation": (int, "neighborhood: dilation per axis (default 1)"),
        "rel_pos_bias": (bool, "neighborhood (default off), swin (default on): relative bias"),
        "window_size": (int, "swin: window side (default: largest divisor <= 7 of the grid); "
                        "hilo: local window (default 2)"),
        "shift_size": (int, "swin: shift of the odd blocks (default window_size // 2)"),
        "alpha": (float, "hilo: fraction of heads on the low-frequency path (default 0.5)"),
        "agent_num": (int, "agent: agent tokens, a square (default min(7, grid)^2)"),
        "sr_ratio": (int, "spatial_reduction (default 2), agent (default 1): key downsampling"),
        "key_dim": (int, "cascaded: q/k size per head (default min(16, dim // num_heads))"),
        "kernels": (int, "cascaded: depthwise query kernel (default min(5, grid), odd)"),
        "qkv_bias": (bool, "grid layers and channel: bias of the q/k/v projection"),
        "qk_scale": (float, "grid layers: logit scale (default 1/sqrt(head_dim))"),
        "head_dim": (int, "global: per-head size (default dim // num_heads)"),
        "qk_norm": (bool, "global: normalize q and k"),
    },
}


def attention_kwargs_config(kind: str = "lm"):
  """``model.attention_kwargs`` for the configs of ``kind`` ("lm" or "vit"): every entry of
  :data:`ATTENTION_KWARGS` ``[kind]`` as a typed ``None`` placeholder (unset: not passed, see
  :func:`model_config`), so that it can be set on the command line, e.g.
  ``--config.model.attention_kwargs.kernel_size=5``. A config file may add other arguments."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from ml_collections.config_dict import placeholder  # pylint: disable=import-outside-toplevel
  if kind not in ATTENTION_KWARGS:
    raise ValueError(f"attention_kwargs_config: kind={kind!r}; allowed values: "
                     f"{sorted(ATTENTION_KWARGS)}")
  ak = ml_collections.ConfigDict()
  for name, (typ, _) in ATTENTION_KWARGS[kind].items():
    ak[name] = placeholder(typ)
  return ak


def model_config(cfg, info) -> dict:
  """``cfg.model`` as a dict with ``None`` entries filled from the dataset info."""
  m = _to_dict(cfg.model)
  kind = m.get("kind")
  if kind not in _FROM_DATA:
    raise ValueError(f"model.kind={kind!r} is not supported by the training script; allowed "
                     f"values: {sorted(_FROM_DATA)}")
  if info.kind != _DATA_KIND[kind]:
    raise ValueError(f"model.kind={kind!r} needs a {_DATA_KIND[kind]!r} dataset, but "
                     f"data.name={info.name!r} is {info.kind!r}")
  if m.get("attention_kwargs") is not None:  # configs list the common keys with None = unset
    m["attention_kwargs"] = {k: v for k, v in m["attention_kwargs"].items() if v is not None}
  for key, attr in _FROM_DATA[kind].items():
    if key in m and m[key] is None:
      v = getattr(info, attr)
      m[key] = {"image_size": lambda s: tuple(s[:2]), "in_channels": lambda s: s[2]}.get(
          key, lambda x: x)(v)
  if kind == "lm" and m.get("vocab_size", 0) < (info.vocab_size or 0):
    raise ValueError(f"model.vocab_size={m.get('vocab_size')} is smaller than the dataset's "
                     f"vocab_size={info.vocab_size}")
  if kind == "vit":
    _check_vit_against_data(m, info)
  return {k: v for k, v in m.items() if v is not None or k in ("num_kv_heads", "head_dim")}


def _check_vit_against_data(m: dict, info):
  """``model.num_classes`` must cover the dataset's labels (a label >= num_classes makes the
  cross-entropy NaN), and ``model.image_size`` / ``model.in_channels`` must match its images."""
  n_data = getattr(info, "num_classes", None)
  n = m.get("num_classes")
  if n_data and isinstance(n, int) and n < n_data:
    raise ValueError(
        f"model.num_classes={n} is smaller than the {n_data} classes of data.name="
        f"{info.name!r} (labels 0..{n_data - 1}; a label >= {n} makes the loss NaN). Leave "
        f"model.num_classes unset (None: taken from the dataset) or set it to at least {n_data}.")
  shape = getattr(info, "image_shape", None)
  if not shape:
    return
  size = m.get("image_size")
  if size is not None:
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if pair != tuple(shape[:2]):
      raise ValueError(
          f"model.image_size={size!r} does not match the {shape[0]}x{shape[1]} images of "
          f"data.name={info.name!r}; leave model.image_size unset (None: taken from the dataset) "
          f"or set it to {shape[0] if shape[0] == shape[1] else tuple(shape[:2])}.")
  ch = m.get("in_channels")
  if ch is not None and ch != shape[2]:
    raise ValueError(
        f"model.in_channels={ch} does not match the {shape[2]} channel(s) of data.name="
        f"{info.name!r}; leave model.in_channels unset (None: taken from the dataset) or set it "
        f"to {shape[2]}.")


class _Timer:
  def __init__(self):
    self.t = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self.t = now - self.t, now
    return dt


def _bytes_per_token(info) -> float | None:
  """Bytes of text per token as the dataset declares it (``DatasetInfo.bytes_per_token``);
  ``None`` (no bits/byte) for datasets whose tokens are not text bytes, even with 256 ids."""
  bpt = getattr(info, "bytes_per_token", None)
  return float(bpt) if bpt else None


CP_STRATEGIES = ("ring", "all_gather", "ulysses")
# mesh.sequence_load_balance value -> attnjax.parallel layout (None = contiguous)
CP_LOAD_BALANCE = {"zigzag": "zigzag", "striped": "striped", "none": None, "contiguous": None}


def _context_parallel_setup(cfg, info, n_seq: int):
  """``None`` without a ``sequence`` axis, else ``{"strategy", "load_balance", "positions"}``
  from ``mesh.sequence_strategy`` (default "ring") and ``mesh.sequence_load_balance``
  (default "zigzag"; "none" = contiguous); ``positions`` is the static layout permutation."""
  if n_seq <= 1:
    return None
  from attnjax import parallel as parallel_lib  # pylint: disable=import-outside-toplevel
  strategy = str(_get(cfg.mesh, "sequence_strategy", "ring"))
  if strategy not in CP_STRATEGIES:
    raise ValueError(f"mesh.sequence_strategy={strategy!r}; the training script supports "
                     f"{CP_STRATEGIES} over the one 'sequence' mesh axis")
  lb_name = str(_get(cfg.mesh, "sequence_load_balance", "zigzag"))
  lb_name = "none" if lb_name == "None" else lb_name  # ml_collections gives the string "None"
  if lb_name not in CP_LOAD_BALANCE:
    raise ValueError(f"mesh.sequence_load_balance={lb_name!r} is not supported; allowed values: "
                     f"{', '.join(repr(k) for k in CP_LOAD_BALANCE)} ('none' and 'contiguous' "
                     f"both keep the tokens in order)")
  lb = CP_LOAD_BALANCE[lb_name]
  T = int(info.seq_len)
  perm = parallel_lib.load_balance_permutation(T, n_seq, lb)  # raises if T does not divide
  return {"strategy": strategy, "load_balance": lb, "positions": np.asarray(perm, np.int32)}


def run(cfg, workdir: str, *, resume: bool = False, resume_step: int | None = None,
        progress: bool = True) -> RunResult:
  """Train and evaluate ``cfg`` in ``workdir`` (see ``configs/`` for the keys).

  ``resume``: continue from the latest checkpoint in ``workdir`` (or ``resume_step``); without
  it an existing checkpoint in ``workdir`` is an error (never overwritten)."""
  from attnjax import data as data_lib  # pylint: disable=import-outside-toplevel
  from attnjax import models as models_lib  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  kind = cfg.model.kind

  # ---------------------------------------------------------------- mesh and batch sizes
  mesh = mesh_lib.make_mesh(cfg.mesh)
  n_seq = mesh_lib.check_sequence_parallel(mesh, kind)
  nb = mesh_lib.batch_axes_size(mesh)
  accum = int(_get(cfg, "grad_accum_steps", 1))
  B = int(cfg.batch_size)
  if accum < 1 or B % (accum * nb):
    raise ValueError(f"batch_size={B} must be divisible by grad_accum_steps ({accum}) x the "
                     f"batch mesh axes data*fsdp ({nb})")
  eval_B = int(_get(cfg, "eval_batch_size", B))
  if eval_B % nb:
    raise ValueError(f"eval_batch_size={eval_B} must be divisible by the batch mesh axes "
                     f"data*fsdp ({nb})")
  # Which rows of each global batch this process loads (raises for a mesh whose process layout
  # cannot be fed that way); the row blocks are whole data*fsdp shards, so they divide B.
  blocks = mesh_lib.process_row_blocks(mesh_lib.batch_sharding(mesh, 2, sequence=n_seq > 1))
  n_blocks, block = blocks.num_blocks, blocks.block_of[jax.process_index()]
  log.info("mesh: %s", mesh_lib.describe_mesh(mesh))
  if jax.process_count() > 1:
    log.info("this process loads batch row block %d of %d", block, n_blocks)

  # ---------------------------------------------------------------- data
  seed = int(cfg.seed)
  train_ds = data_lib.make_dataset(cfg.data, split="train", batch_size=B // n_blocks,
                                   seed=seed, shard_index=block, shard_count=n_blocks)
  eval_ds = data_lib.make_dataset(cfg.data, split="eval", batch_size=eval_B // n_blocks,
                                  seed=seed, shard_index=block, shard_count=n_blocks)
  info = train_ds.info

  # ---------------------------------------------------------------- model, optimizer, shardings
  mcfg = model_config(cfg, info)
  cp = _context_parallel_setup(cfg, info, n_seq)
  num_steps = int(cfg.num_steps)
  tx, schedule = optim_lib.make_optimizer(cfg.optim, num_steps)

  def init_fn():
    model = models_lib.build_model(mcfg, rngs=nnx.Rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed))}

  abs_model = nnx.eval_shape(lambda: models_lib.build_model(mcfg, rngs=nnx.Rngs(seed)))
  if cp is not None:  # static model structure: it travels in the graphdef into the steps
    abs_model.set_context_parallel(mesh, axis=mesh_lib.SEQUENCE_AXIS, strategy=cp["strategy"],
                                   load_balance=cp["load_balance"],
                                   batch_axis=mesh_lib.BATCH_AXES)
    log.info("context parallelism: sequence=%d, strategy=%s, load_balance=%s", n_seq,
             cp["strategy"], cp["load_balance"])
  graphdef, _, _ = nnx.split(abs_model, nnx.Param, ...)
  abs_state = jax.eval_shape(init_fn)
  state_sh = mesh_lib.param_shardings(abs_state, mesh,
                                      int(_get(cfg.mesh, "fsdp_min_size", 2 ** 14)))
  abs_state_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abs_state, state_sh)
  n_params = steps_lib.count_params(abs_state["params"])
  log.info("model: %s, %s parameters", kind, f"{n_params:,}")

  # ---------------------------------------------------------------- checkpoints / resume
  ck = cfg.checkpoint
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=int(_get(ck, "max_to_keep", 3)),
                               async_save=bool(_get(ck, "async_save", True)))
  train_iter = train_ds.iterator()
  existing = ckpt.all_steps()
  state, restored_meta = None, {}
  if existing and not resume:
    raise ckpt_lib.CheckpointError(
        f"{workdir} already holds checkpoints (steps {existing}); pass --resume to continue "
        f"that run, or choose another --workdir. Nothing was overwritten.")
  if resume and existing:
    step0 = existing[-1] if resume_step is None else int(resume_step)
    later = [s for s in existing if s > step0]
    if later:
      raise ckpt_lib.CheckpointError(
          f"--resume_step={step0}: {ckpt.directory} also holds the later checkpoints {later}, "
          f"which this run would overwrite. Move them out of the way first (e.g. "
          f"mv {ckpt.directory}/{later[-1]} {workdir}/bad-{later[-1]}); nothing was changed.")
    state, restored_meta = ckpt.restore(step0, abs_state_sh, train_iter)
    if restored_meta.get("config_hash") not in (None, config_hash(cfg)):
      log.warning("resuming step %d of a run with a different model/data/optim config "
                  "(hash %s, now %s)", step0, restored_meta.get("config_hash"), config_hash(cfg))
    log.info("resumed from step %d of %s", step0, ckpt.directory)
  elif resume:
    log.info("--resume: no checkpoint in %s, starting from step 0", ckpt.directory)
  if state is None:
    state = jax.jit(init_fn, out_shardings=state_sh)()
  start = int(state["step"])
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(_to_dict(cfg), f, indent=2, default=str)

  # ---------------------------------------------------------------- compiled steps
  cp_positions = None if cp is None else cp["positions"]

  def to_device(local_batch):
    """Host batch -> global sharded arrays; under context parallelism the token axis is first
    permuted into the load-balancing layout (the loss is a sum over tokens: unchanged)."""
    if cp is None:
      return mesh_lib.global_batch(mesh, local_batch, num_blocks=n_blocks)
    from attnjax import parallel as parallel_lib  # pylint: disable=import-outside-toplevel
    for key, v in local_batch.items():
      if np.ndim(v) < 2 or np.shape(v)[1] != len(cp_positions):
        raise ValueError(f"context parallelism: batch[{key!r}] has shape {np.shape(v)}, "
                         f"expected [B, {len(cp_positions)}, ...] (data.seq_len tokens)")
    return mesh_lib.global_batch(mesh, parallel_lib.permute_batch(local_batch, cp_positions),
                                 sequence=True, num_blocks=n_blocks)

  train_step = jax.jit(
      steps_lib.make_train_step(kind, graphdef, tx, schedule, mesh=mesh, grad_accum_steps=accum,
                                aux_loss_coef=float(_get(cfg, "aux_loss_coef", 0.0)),
                                positions=cp_positions),
      in_shardings=(state_sh, None), out_shardings=(state_sh, mesh_lib.replicated(mesh)),
      donate_argnums=0)
  eval_step = jax.jit(steps_lib.make_eval_step(kind, graphdef, cp_positions),
                      in_shardings=(state_sh["params"], state_sh["rest"], None),
                      out_shardings=mesh_lib.replicated(mesh))
  bpt = _bytes_per_token(info)  # None: no bits/byte (e.g. mqar token ids are not bytes)
  # The unigram baseline (byte corpora) is scored on the target bytes the model is scored on:
  # a histogram of the eval batches' weighted targets, taken in the first evaluation (every
  # evaluation reads the same eval_steps batches).
  eval_counts = {"counts": None, "wanted": kind == "lm" and bpt is not None}
  vocab = int(info.vocab_size or 0)
  count_targets = jax.jit(
      lambda b: jnp.zeros((vocab,), jnp.float32).at[b["targets"].reshape(-1)].add(
          b["weights"].reshape(-1).astype(jnp.float32)),
      out_shardings=mesh_lib.replicated(mesh))

  def evaluate(st) -> dict:
    max_batches = int(_get(cfg, "eval_steps", -1))
    take_counts = eval_counts["wanted"] and eval_counts["counts"] is None
    counts = np.zeros(vocab, np.float64) if take_counts else None
    sums, n = None, 0
    for batch in eval_ds.iterator():
      if 0 < max_batches <= n:
        break
      batch = to_device(batch)
      m = eval_step(st["params"], st["rest"], batch)
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      if take_counts:  # exact per batch in float32; summed in float64
        counts += np.asarray(jax.device_get(count_targets(batch)), np.float64)
      n += 1
    if take_counts:
      eval_counts["counts"] = counts
    return steps_lib.summarize(kind, jax.device_get(sums), bpt)

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main,
                                    resume_step=start if start > 0 else None)
  log_every = max(1, int(_get(cfg, "log_every", 50)))
  eval_every = int(_get(cfg, "eval_every", 0))
  ckpt_every = int(_get(ck, "every", 0))
  units = "tokens" if kind == "lm" else "images"
  per_step = B * (info.seq_len if kind == "lm" else 1)
  meta = {"kind": kind, "param_count": n_params, "config_hash": config_hash(cfg)}
  history = {"train_time": 0.0, "train_steps": 0}
  # (step, per-step metrics) since the last train record; a resumed run continues the window
  # the checkpoint cut (records end at multiples of log_every, as in an uninterrupted run)
  pending = _restore_log_window(restored_meta, start, log_every, num_steps)
  eval_metrics = None
  pbar = None
  if progress and is_main:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    pbar = tqdm(total=num_steps, initial=start, desc=f"train {kind}", unit="step",
                dynamic_ncols=True)
  timer, timed_steps = None, 0
  try:
    if start == 0 and bool(_get(cfg, "eval_at_start", False)):
      eval_metrics = evaluate(state)
      writer.write(0, "eval", eval_metrics)
    for step in range(start, num_steps):
      batch = to_device(next(train_iter))
      state, m = train_step(state, batch)
      pending.append((step + 1, m))
      if timer is None:  # exclude compilation and the first step from throughput
        jax.block_until_ready(m)
        timer, timed_steps = _Timer(), 0
        pending_time_steps = 0
      else:
        timed_steps += 1
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        ms = jax.device_get([x for _, x in pending])
        pending = []
        sums = {k: sum(float(x[k]) for x in ms) for k in steps_lib.METRIC_KEYS}
        sums["aux"] /= len(ms)
        rec = steps_lib.summarize(kind, sums, bpt)
        if not np.isfinite(rec["loss"]):
          raise NonFiniteLossError(
              f"train loss is {rec['loss']} at step {done} (mean of steps "
              f"{done - len(ms) + 1}..{done}); stopped before it is checkpointed (checkpoints "
              f"so far: {ckpt.all_steps() or 'none'}). Likely causes: targets outside the "
              f"model's outputs (a config that does not match the data, e.g. "
              f"model.num_classes / model.vocab_size smaller than the dataset's), non-finite "
              f"inputs from a custom dataset, a learning rate too high for this model "
              f"(optim.lr, optim.warmup_steps, optim.grad_clip) or a low-precision overflow "
              f"(model.dtype). To locate the first non-finite value, rerun with "
              f"JAX_DEBUG_NANS=True. Fix the cause, then --resume or start a new --workdir.")
        rec["grad_norm"] = float(ms[-1]["grad_norm"])
        rec["lr"] = float(ms[-1]["lr"])
        dt = timer.lap()
        if timed_steps - pending_time_steps > 0 and dt > 0:
          n = timed_steps - pending_time_steps
          rec[f"{units}_per_s"] = n * per_step / dt
          history["train_time"] += dt
          history["train_steps"] += n
        pending_time_steps = timed_steps
        writer.write(done, "train", rec)
        if pbar is not None:
          post = {"loss": f"{rec['loss']:.3f}"}
          if f"{units}_per_s" in rec:
            post[f"{units[:3]}/s"] = f"{rec[f'{units}_per_s']:.0f}"
          pbar.set_postfix(post, refresh=False)
      if (eval_every and done % eval_every == 0) or done == num_steps:
        t_eval = time.perf_counter()
        eval_metrics = evaluate(state)
        writer.write(done, "eval", eval_metrics)
        if pbar is not None:
          pbar.write(f"step {done}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in
                                                       eval_metrics.items()))
        if timer is not None:  # eval time is not training throughput
          timer.t += time.perf_counter() - t_eval
      if (ckpt_every and done % ckpt_every == 0) or done == num_steps:
        t_ck = time.perf_counter()
        pending = [(s, _host_metrics(x)) for s, x in pending]
        ckpt.save(done, state, train_iter,
                  dict(meta, log_window=[dict(x, step=s) for s, x in pending]))
        if timer is not None:
          timer.t += time.perf_counter() - t_ck
      if pbar is not None:
        pbar.update(1)
  finally:
    if pbar is not None:
      pbar.close()
    ckpt.close()
    writer.close()

  if start >= num_steps:  # resumed at the end: evaluate the restored state
    eval_metrics = evaluate(state)

  # ---------------------------------------------------------------- summary
  model = nnx.merge(graphdef, state["params"], state["rest"])
  if cp is not None:  # the returned model (and the sample below) runs on one device
    model.set_context_parallel(None)
  summary = {"config": os.path.basename(str(_get(cfg, "name", ""))) or None,
             "kind": kind, "dataset": info.name, "steps": num_steps, "resumed_from": start,
             "param_count": n_params, "seed": seed, "model_config": mcfg,
             "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
             "devices": int(mesh.devices.size), "platform": mesh.devices.flat[0].platform,
             "final_eval": eval_metrics, "wall_time_s": time.perf_counter() - t_start}
  if cp is not None:
    summary["context_parallel"] = {"strategy": cp["strategy"],
                                   "load_balance": cp["load_balance"]}
  if history["train_steps"]:
    summary[f"train_{units}_per_s"] = history["train_steps"] * per_step / history["train_time"]
  if kind == "lm":
    if eval_counts["counts"] is not None:
      try:
        summary["unigram_bits_per_byte"] = float(data_lib.unigram_bits_per_byte(
            cfg.data, eval_counts=eval_counts["counts"]))
      except Exception as e:  # pylint: disable=broad-except
        log.warning("no unigram baseline for %s: %s", info.name, e)
    sample_cfg = _get(cfg, "sample", {})
    n_new = int(_get(sample_cfg, "max_new_tokens", 0))
    if n_new > 0 and info.vocab_size == 256:
      prompt = str(_get(sample_cfg, "prompt", "def ")).encode("utf-8")
      toks = models_lib.generate(model, np.frombuffer(prompt, np.uint8).astype(np.int32)[None],
                                 n_new, temperature=0.0)
      out = bytes(np.asarray(jax.device_get(toks))[0].astype(np.uint8).tolist())
      summary["sample"] = {"prompt": metrics_lib.safe_bytes(prompt),
                           "greedy_continuation": metrics_lib.safe_bytes(out[len(prompt):])}
  if is_main:
    metrics_lib.plot_curves(workdir, kind)
    metrics_lib.write_summary(workdir, summary)
    _print_summary(summary)
  return RunResult(summary=summary, state=state, model=model, workdir=workdir)


def _host_metrics(m) -> dict[str, float]:
  """One step's metrics (device scalars) as Python floats (exact: float32 -> float64)."""
  return {k: float(v) for k, v in jax.device_get(m).items()}


def _restore_log_window(restored_meta: dict, start: int, log_every: int,
                        num_steps: int) -> list:
  """The ``(step, metrics)`` of steps ``(start - start % log_every, start]`` saved with the
  checkpoint of step ``start`` (its ``log_window``), so that the first train record after the
  resume covers the same steps as in an uninterrupted run. A checkpoint of an older version (or
  of a run with a different ``log_every``) may lack some of them: the record then averages only
  the steps it has, and a warning says so."""
  if start >= num_steps:
    return []
  first = start - start % log_every + 1
  saved = {int(r["step"]): {k: float(v) for k, v in r.items() if k != "step"}
           for r in (restored_meta.get("log_window") or [])}
  window = [(s, saved[s]) for s in range(first, start + 1) if s in saved]
  if len(window) != start + 1 - first:
    log.warning("the checkpoint of step %d lacks the metrics of steps %d..%d (saved by another "
                "version or log_every); the train record of step %d averages fewer steps than "
                "an uninterrupted run's", start, first, start,
                min(start - start % log_every + log_every, num_steps))
  return window


def _print_summary(s: dict):
  ev = s["final_eval"]
  lines = [f"== {s['kind']} on {s['dataset']}: {s['steps']} steps, {s['param_count']:,} params, "
           f"{s['devices']} {s['platform']} device(s), {s['wall_time_s']:.1f}s wall"]
  if s["kind"] == "lm":
    line = f"eval loss {ev['loss']:.4f} nats/token"
    if "bits_per_byte" in ev:
      line += f", {ev['bits_per_byte']:.4f} bits/byte"
    if "unigram_bits_per_byte" in s:
      line += f" (unigram baseline {s['unigram_bits_per_byte']:.4f})"
    lines.append(line)
  else:
    lines.append(f"eval loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}")
  for k in ("train_tokens_per_s", "train_images_per_s"):
    if k in s:
      lines.append(f"throughput {s[k]:.0f} {k.split('_')[1]}/s")
  if "sample" in s:
    lines.append(f"sample (greedy): {s['sample']['prompt']!r} -> "
                 f"{s['sample']['greedy_continuation']!r}")
  print("\n".join(lines), flush=True)
