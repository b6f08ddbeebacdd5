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


def test_tokamax_peer():
  """tokamax reads absl flags from sys.argv; the script must shield it from its own options."""
  pytest.importorskip("tokamax")
  res = _load_bench().main(TINY + ["--masks", "causal", "--no-backward", "--impl", "chunked",
                           "--peers", "tokamax", "--ref-max-t", "0"])
  row = res["rows"][-1]
  assert (row.impl, row.fwd.status) == ("tokamax(xla_chunked)", "ok")
  assert row.fwd.err < 1e-4
