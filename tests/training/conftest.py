"""Training tests compile the same programs several times (a run and its resumption, a killed
subprocess and its reference run): a persistent compilation cache for this test session (a
fresh temporary directory, also handed to subprocesses through the environment) reuses them."""

import os

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  old_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  if old_env is None:
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  else:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = old_env
