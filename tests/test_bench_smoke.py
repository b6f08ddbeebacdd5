"""Smoke test of experiments/bench_attention.py: runs its main() in-process on a tiny problem
(T=128, one repeat, JAX peers only) and checks the table's rows. Not a timing test: nothing here
depends on how fast anything ran."""

from __future__ import annotations

import csv
import importlib.util
import io
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_attention.py"

# Neighborhood on T=128 uses the square 11x11 grid (121 tokens), hence kernel 5 (13 > 11).
TINY = ["--lengths", "128", "--repeats", "1", "--warmup", "0", "--nb-kernel", "5", "--quiet"]
EXPECTED_MASKS = [("causal", 128), ("sliding(511,0)", 128), ("neighborhood 11x11 k5", 121)]
EXPECTED_IMPLS = ["chunked", "jax.nn(xla)"]


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod
  spec.loader.exec_module(mod)
  return mod


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod   # dataclasses resolve string annotations through sys.modules
  spec.loader.exec_module(mod)
  return mod


def test_bench_table(tmp_path):
  """One in-process run (one test, so pytest-xdist never runs it twice), then its table."""
  bench = _load_bench()
  # --ref-max-t 0 keeps the test short: errors are then measured against chunked.
  res = bench.main(TINY + ["--impl", "chunked", "--peers", "jax_nn", "--ref-max-t", "0",
                           "--out-md", str(tmp_path / "b.md"), "--out-csv",
                           str(tmp_path / "b.csv")])

  # rows and measurements
  rows = res["rows"]
  assert [(r.mask, r.T, r.impl) for r in rows] == [
      (m, t, i) for m, t in EXPECTED_MASKS for i in EXPECTED_IMPLS]
  for r in rows:
    for p in (r.fwd, r.bwd):
      assert p.status == "ok", (r.mask, r.impl, p.status)
      assert p.ms > 0 and p.temp_mib is not None and p.repeats == 1
      # jax.nn expresses each mask its own way (is_causal, local_window_size, a dense mask):
      # it must agree with attnjax chunked, the base here.
      assert p.err is not None and p.err < 1e-4, (r.mask, r.impl, p.err)
    assert r.err_vs == "chunked"

  # ratios
  by = {(r.kind, r.impl): r for r in rows}
  base, dense = by[("causal", "chunked")], by[("causal", "jax.nn(xla)")]
  assert base.ratios["fwd_time"] == pytest.approx(1.0)
  assert dense.ratios["fwd_time"] == pytest.approx(base.fwd.ms / dense.fwd.ms)
  assert dense.ratios["fwdbwd_temp"] == pytest.approx(base.bwd.temp_mib / dense.bwd.temp_mib)
  sliding = by[("sliding", "chunked")]
  assert sliding.ratios["vs_causal_fwd"] == pytest.approx(sliding.fwd.ms / base.fwd.ms)
  # interleaved timing (the default): one round here, so each paired ratio is that round's
  for r in rows:
    assert sorted(r.fwd.round_s) == sorted(r.bwd.round_s) == [0]
  pr = dense.ratios["fwd_time_paired"]
  assert pr.n == 1 and pr.median == pytest.approx(base.fwd.round_s[0] / dense.fwd.round_s[0])
  pr = sliding.ratios["vs_causal_fwd_paired"]
  assert pr.median == pytest.approx(sliding.fwd.round_s[0] / base.fwd.round_s[0])

  # markdown (stdout and --out-md) and CSV
  md = res["markdown"]
  assert md == (tmp_path / "b.md").read_text()
  assert "CPU:" in md and "jax 0." in md and "Targets of issue 2" in md
  lines = md.splitlines()
  header = next(i for i, ln in enumerate(lines) if ln.startswith("| mask | T | impl |"))
  table = lines[header + 2:header + 2 + len(rows)]
  assert [tuple(c.strip() for c in ln.split("|")[1:4]) for ln in table] == [
      (m, str(t), i) for m, t in EXPECTED_MASKS for i in EXPECTED_IMPLS]
  data = [ln for ln in (tmp_path / "b.csv").read_text().splitlines() if not ln.startswith("#")]
  recs = list(csv.DictReader(io.StringIO("\n".join(data))))
  assert [(r["mask"], r["impl"]) for r in recs] == [
      (m, i) for m, _ in EXPECTED_MASKS for i in EXPECTED_IMPLS]
  assert all(r["ratio_base"] == "chunked" and float(r["fwd_ms"]) > 0 for r in recs)


def test_paired_ratios_and_back_to_back_mode():
  """Paired ratios use only the rounds both timings have; --no-interleave times per case."""
  bench = _load_bench()
  report = sys.modules["bench_report"]
  a, b = bench.PassResult(status="ok"), bench.PassResult(status="ok")
  a.round_s, b.round_s = {0: 2.0, 1: 3.0, 2: 8.0}, {0: 1.0, 1: 1.0, 3: 5.0}
  pr = report._paired(a, b)
  assert (pr.median, pr.lo, pr.hi, pr.n) == (2.5, 2.0, 3.0, 2)
  b.status = "error: x"
  assert report._paired(a, b) is None
  res = bench.main(TINY + ["--masks", "causal", "--no-backward", "--impl", "chunked",
                           "--peers", "jax_nn", "--ref-max-t", "0", "--no-interleave"])
  for r in res["rows"]:
    assert r.fwd.status == "ok" and r.fwd.ms > 0 and r.fwd.round_s == {}
    assert r.ratios.get("fwd_time_paired") is None
  assert "back to back per case" in res["markdown"]


def test_timed_calls_per_sample_accounting():
  """With N calls per sample, first_s is one execution (call_once), samples are divided by N,
  and the warm-up and timed calls are whole samples."""
  bench = _load_bench()
  log = []
  res = bench.PassResult(per_sample=4)
  out = bench._timed_calls(lambda: log.append("sample") or "s", warmup=2, repeats=3,
                           budget_s=60.0, res=res, call_once=lambda: log.append("one") or "o")
  assert out == "o" and log == ["one"] + ["sample"] * 4   # 1 warm-up sample + 3 timed
  assert res.repeats == 3 and res.first_s is not None and res.ms is not None


def test_tokamax_peer():
  """tokamax reads absl flags from sys.argv; the script must shield it from its own options."""
  pytest.importorskip("tokamax")
  res = _load_bench().main(TINY + ["--masks", "causal", "--no-backward", "--impl", "chunked",
                           "--peers", "tokamax", "--ref-max-t", "0"])
  row = res["rows"][-1]
  assert (row.impl, row.fwd.status) == ("tokamax(xla_chunked)", "ok")
  assert row.fwd.err < 1e-4


# ------------------------------------------------------------- issue 3: FLOPs, Pallas, hw peers
def test_visible_pairs_and_flops_brute_force():
  """Visible pairs (block map + partial blocks, ragged last block, several slabs per block row)
  against an explicit double loop on tiny masks."""
  bench = _load_bench()
  hw = sys.modules["bench_peers_hw"]
  from attnjax import masks

  def brute(kind, T, w=3, grid=(5, 6), kern=3):
    if kind == "neighborhood":
      (r, c), half = grid, kern // 2
      def vis(i, j):
        r0 = min(max(i // c - half, 0), r - kern)
        c0 = min(max(i % c - half, 0), c - kern)
        return r0 <= j // c < r0 + kern and c0 <= j % c < c0 + kern
    elif kind == "sliding":
      def vis(i, j):
        return i - w <= j <= i
    else:
      def vis(i, j):
        return j <= i
    return sum(vis(i, j) for i in range(T) for j in range(T))

  cases = [("causal", masks.causal(), 37), ("sliding", masks.sliding_window(3, 0), 37),
           ("neighborhood", masks.neighborhood((5, 6), 3), 30)]
  old = hw._ROWS_PER_CHUNK
  hw._ROWS_PER_CHUNK = 64          # slabs of 64 // block keys
  try:
    for kind, m, T in cases:
      n = brute(kind, T)
      assert hw.visible_pairs(m, T) == n, kind
      assert hw.visible_pairs(m, T, block=8) == n, kind
      assert hw.visible_pairs(m, T, block=16) == n, kind
      assert hw.attention_flops(n, 2, 3, 8) == 4 * 2 * 3 * 8 * n
      assert hw.attention_flops(n, 2, 3, 8, backward=True) == pytest.approx(3.5 * 4 * 48 * n)
  finally:
    hw._ROWS_PER_CHUNK = old
  assert hw.visible_pairs(masks.causal(), 1000) == 1000 * 1001 // 2
  assert bench.ALL_PEERS[-2:] == ["jax_nn_cudnn", "splash"]


def test_pallas_refused_without_allow_interpret(capsys):
  bench = _load_bench()
  if bench.jax.default_backend() == "gpu":
    pytest.skip("on a GPU pallas_gpu is not interpreted")
  with pytest.raises(SystemExit):
    bench.parse_args(["--impl", "pallas_gpu:16x16", "--lengths", "32"])
  assert "interpret mode" in capsys.readouterr().err


def test_pallas_interpret_tiny_run_and_hw_peers_skipped():
  """--allow-interpret: T=32 causal forward on pallas_gpu (interpret) with the TFLOP/s columns;
  on CPU the hardware peers are rows saying why they were skipped."""
  bench = _load_bench()
  if bench.jax.default_backend() != "cpu":
    pytest.skip("CPU-only expectations")
  res = bench.main(["--lengths", "32", "--masks", "causal", "--repeats", "1", "--warmup", "0",
                    "--no-backward", "--ref-max-t", "0", "--quiet", "--allow-interpret",
                    "--impl", "pallas_gpu:16x16", "--peers", "jax_nn", "jax_nn_cudnn",
                    "splash"])
  rows = {r.impl: r for r in res["rows"]}
  assert list(rows) == ["pallas_gpu:16x16", "jax.nn(xla)", "jax.nn(cudnn)", "splash"]
  p, peer = rows["pallas_gpu:16x16"], rows["jax.nn(xla)"]
  assert p.fwd.status == "ok" and p.fwd.err < 1e-5
  assert p.flops == 4 * 1 * 8 * 64 * (32 * 33 // 2)
  assert p.tflops["fwd"] == pytest.approx(p.flops / (p.fwd.ms * 1e-3) / 1e12)
  assert p.ratios["vs_best_peer_fwd"] == pytest.approx(p.tflops["fwd"] / peer.tflops["fwd"])
  assert any("INTERPRET MODE" in n for n in p.notes)
  assert rows["jax.nn(cudnn)"].fwd.status.startswith("skipped (needs a GPU")
  assert rows["splash"].fwd.status.startswith("skipped (needs a TPU")
  md = res["markdown"]
  assert "| fwd TFLOP/s |" in md and "this/best peer fwd" in md and "Targets of issue 3" in md


def test_bench_decode_refusal_and_tiny_interpret_run(capsys):
  """experiments/bench_decode.py: refuses interpret mode by default; tiny interpret run agrees
  with attnjax xla."""
  spec = importlib.util.spec_from_file_location("bench_decode", BENCH.parent / "bench_decode.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if mod.jax.default_backend() != "cpu":
    pytest.skip("CPU-only expectations")
  with pytest.raises(SystemExit):
    mod.parse_args(["--lengths", "64"])
  assert "interpret mode" in capsys.readouterr().err
  rows = mod.main(["--allow-interpret", "--lengths", "64", "--batch", "1", "--heads", "4",
                   "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--block-kv",
                   "16", "--num-splits", "2", "--repeats", "1", "--warmup", "1"])
  assert len(rows) == 1 and rows[0]["decode_ms"] > 0 and rows[0]["err"] < 1e-5
  assert len(rows[0]["decode_round_s"]) == len(rows[0]["xla_round_s"]) == 1
  out = capsys.readouterr().out
  assert "INTERPRET MODE" in out and "interleaved rounds" in out


def test_bench_decode_rounds_alternate_and_sync_once_per_sample(monkeypatch):
  """Timed rounds alternate the two programs (paired), and a sample of N calls dispatches them
  back to back and waits once (a wait per call added its latency to sub-ms kernels)."""
  mod = _load_script("bench_decode")
  log = []
  monkeypatch.setattr(mod.jax, "block_until_ready", lambda x: log.append(("sync", x)) or x)
  cases = {"decode": (lambda a: log.append(("decode", a)) or "d", (1,)),
           "xla": (lambda a: log.append(("xla", a)) or "x", (2,))}
  outs, times = mod.time_interleaved(cases, warmup=1, repeats=2, calls=3)
  assert outs == {"decode": "d", "xla": "x"}
  assert [len(t) for t in times.values()] == [2, 2]
  first = [("decode", 1), ("sync", "d"), ("xla", 2), ("sync", "x")]   # compile + first call
  sample = lambda name, a, out: [(name, a)] * 3 + [("sync", out)]
  rnd = sample("decode", 1, "d") + sample("xla", 2, "x")
  assert log == first + rnd + rnd


def test_header_describes_each_chunked_impl():
  """The header says how every chunked impl of --impl computes each mask (it described the
  default backend even for chunked:BQxBK)."""
  bench = _load_bench()
  peers = sys.modules["bench_peers"]
  args = bench.parse_args(["--lengths", "4096", "--masks", "causal", "sliding",
                           "--impl", "chunked", "chunked:64x128", "xla"])
  text = peers.chunked_plans(args)
  assert text.startswith("chunked (causal: tiles 512x512; sliding(511,0): band: 128 query rows")
  assert "; chunked:64x128 (causal: tiles 64x128; sliding(511,0): tiles 64x128)" in text
  assert peers.chunked_plans(bench.parse_args(["--impl", "xla"])) == "not measured"


def test_sliding_floor_runs():
  """experiments/sliding_floor.py on a tiny problem: every case is timed and reported (not a
  timing test)."""
  path = BENCH.parent / "sliding_floor.py"
  spec = importlib.util.spec_from_file_location("sliding_floor", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  res = mod.main(["--length", "256", "--window", "63", "--heads", "2", "--head-dim", "8",
                  "--rounds", "1"])
  names = ["chunked causal", "chunked sliding", "floor: dots 128 x 64", "floor: softmax 128 x 64",
           "floor: dots 128 x 192", "floor: softmax 128 x 192", "floor: dots 64 x 128",
           "floor: softmax 64 x 128", "floor: dots 32 x 128", "floor: softmax 32 x 128"]
  assert list(res["times"]) == names
  # the header names the CPU model (it said only "x86_64"), as bench_attention's does
  common = _load_script("bench_common")
  assert common.cpu_model() in res["markdown"].splitlines()[0]
  assert all(len(t) == 1 and t[0] > 0 for t in res["times"].values())
  assert res["ratios"]["chunked causal"] == pytest.approx(1.0)
  assert "| chunked sliding |" in res["markdown"]
  with pytest.raises(SystemExit):
    mod.main(["--length", "200"])


@pytest.mark.slow   # two torch.compile runs: ~5-20 s on a 2-core CPU
def test_flex_compiled_peer_compiles_nothing_inside_the_timed_rounds():
  """The compiled torch flex_attention peer: every case of a length is compiled before the
  timed rounds start. (torch._dynamo.reset() ran while building each mask case, discarding the
  compiled code of the cases built before it: they recompiled in timed round 1.) Counts
  dynamo's compiled frames during the interleaved rounds: 0."""
  pytest.importorskip("torch.nn.attention.flex_attention")
  from torch._dynamo.utils import counters
  bench = _load_bench()
  in_rounds = []
  orig = bench.Bench.time_rounds

  def time_rounds(self, T):
    c0 = counters["frames"]["total"]
    orig(self, T)
    in_rounds.append(counters["frames"]["total"] - c0)
  bench.Bench.time_rounds = time_rounds
  c_start = counters["frames"]["total"]
  res = bench.main(["--lengths", "128", "--masks", "causal", "sliding", "--window", "31",
                    "--repeats", "2", "--warmup", "0", "--no-backward", "--ref-max-t", "0",
                    "--impl", "chunked", "--peers", "torch_flex", "--flex-compile", "on",
                    "--quiet"])
  flex = [r for r in res["rows"] if r.impl == "torch_flex(compiled)"]
  assert [r.fwd.status for r in flex] == ["ok", "ok"], [r.notes for r in flex]
  assert not any("ran eager" in n for r in flex for n in r.notes)
  assert counters["frames"]["total"] - c_start >= 2    # both cases were compiled ...
  assert in_rounds == [0]                              # ... before the timed rounds
  assert [r.fwd.timed_compiles for r in flex] == [0, 0]
  assert all(len(r.fwd.round_s) == 2 for r in flex)


@pytest.mark.parametrize("script,argv,message", [
    ("bench_decode", ["--allow-interpret", "--repeats", "0"], "--repeats: must be an integer >= 1"),
    ("bench_decode", ["--allow-interpret", "--lengths", "0"], "--lengths: must be an integer >= 1"),
    ("bench_decode", ["--allow-interpret", "--batch", "-2"], "--batch: must be an integer >= 1"),
    ("bench_decode", ["--allow-interpret", "--heads", "5", "--kv-heads", "2"],
     "--kv-heads 2 must divide --heads 5"),
    ("bench_decode", ["--allow-interpret", "--num-splits", "0"], "--num-splits: must be an"),
    ("bench_decode", ["--allow-interpret", "--block-kv", "100"], "--block-kv: block_kv=100"),
    ("bench_attention", ["--lengths", "0"], "--lengths: must be an integer >= 1, got 0"),
    ("bench_attention", ["--heads", "0"], "--heads: must be an integer >= 1"),
    ("bench_attention", ["--head-dim", "-1"], "--head-dim: must be an integer >= 1"),
    ("bench_attention", ["--window", "-1"], "--window: must be an integer >= 0"),
    ("bench_attention", ["--threads", "0"], "--threads: must be an integer >= 1"),
    ("bench_attention", ["--max-seconds-per-case", "-1"], "--max-seconds-per-case: must be a"),
    ("bench_attention", ["--ratio-base", "foo", "--impl", "chunked", "xla", "--peers", "jax_nn"],
     "--ratio-base 'foo' is not a row of this run; allowed values (--impl and --peers labels): "
     "'chunked', 'xla', 'jax.nn(xla)'"),
    ("sliding_floor", ["--heads", "0"], "--heads: must be an integer >= 1"),
    ("sweep_pallas_gpu", ["--configs", "64"], "bad config '64': expected 'default' or "
     "BQxBK[:warps[:stages]]"),
    ("sweep_pallas_gpu", ["--configs", "64x64:four"], "bad config '64x64:four'"),
    ("sweep_pallas_gpu", ["--configs", "0x64"], "must be >= 1"),
    ("sweep_pallas_gpu", ["--masks", "causl"], "invalid choice: 'causl'"),
    ("sweep_pallas_gpu", ["--lengths", "0"], "--lengths: must be an integer >= 1"),
    ("bench_context_parallel", ["--repeats", "0"], "--repeats: must be an integer >= 1"),
    ("bench_context_parallel", ["--seq-len", "-8"], "--seq-len: must be an integer >= 1"),
    ("bench_context_parallel", ["--devices", "4"], "--devices 4 would be ignored: XLA_FLAGS "
     "already sets --xla_force_host_platform_device_count=8"),
])
def test_script_argument_errors(capsys, script, argv, message):
  """Bad sizes are argparse errors naming the option (they were tracebacks from deep inside a
  run, a NaN median, or silently accepted), raised before anything needs a GPU."""
  mod = _load_script(script)
  parse = {"bench_decode": "parse_args", "bench_attention": "parse_args",
           "sweep_pallas_gpu": "parse_args", "sliding_floor": "main",
           "bench_context_parallel": "_parse_args"}[script]
  if script == "bench_decode" and mod.jax.default_backend() != "cpu" and "--block-kv" in argv:
    pytest.skip("the block_kv rule checked here is the interpreted GPU kernel's")
  kw = {"environ": {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}} if (
      script == "bench_context_parallel") else {}
  with pytest.raises(SystemExit) as e:
    getattr(mod, parse)(argv, **kw)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_context_parallel_sizes_and_device_count():
  mod = _load_script("bench_context_parallel")
  args = mod._parse_args(["--seq-len", "36", "--heads", "6", "--kv-heads", "2"], environ={})
  assert args.devices == 8
  errs = mod.size_errors(args, 4)
  assert any("--seq-len 36 must be a multiple of 2 x 4" in e for e in errs)
  assert any("--heads 6 must be a multiple of the 4 devices" in e for e in errs)
  assert mod.size_errors(mod._parse_args([], environ={}), 8) == []
  flag = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert mod._parse_args([], environ=flag).devices == 4           # the flag's count is used
  assert mod._parse_args(["--devices", "4"], environ=flag).devices == 4


def test_sweep_config_parsing():
  mod = _load_script("sweep_pallas_gpu")
  args = mod.parse_args(["--configs", "default", "64x128", "128X64:4:3", "64x64::2"])
  assert args.configs == [(None,) * 4, (64, 128, None, None), (128, 64, 4, 3), (64, 64, None, 2)]
  assert mod.parse_args([]).configs[1] == (64, 64, None, None)   # defaults parsed too
