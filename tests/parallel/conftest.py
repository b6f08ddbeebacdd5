"""8 simulated CPU devices for the context-parallel tests.

``--xla_force_host_platform_device_count`` (and ``jax_num_cpu_devices``) only take effect if set
before JAX creates its CPU backend, which happens at the first computation, not at ``import
jax``. pytest imports this conftest when it collects ``tests/parallel`` -- in every xdist worker,
before any test runs -- so setting both here works as long as no module collected earlier in
the same worker ran a JAX computation at import time. If one did, the ``_eight_devices``
fixture fails every test here with an explanation instead of silently running on one device.
"""

import os
import re

_FLAG = "--xla_force_host_platform_device_count"
NUM_DEVICES = 8


def _request_devices(n: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  m = re.search(rf"{_FLAG}=(\d+)", flags)
  if m and int(m.group(1)) >= n:
    return
  flags = re.sub(rf"{_FLAG}=\d+", "", flags).strip()
  os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()


_request_devices(NUM_DEVICES)

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

try:
  if jax.config.jax_num_cpu_devices < NUM_DEVICES:
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
except Exception:  # backend already initialized: reported by the fixture below
  pass


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
  n = jax.device_count()
  if n < NUM_DEVICES:
    pytest.fail(
        f"tests/parallel need {NUM_DEVICES} (simulated) devices but JAX has {n}: its backend was "
        f"initialized before tests/parallel/conftest.py could set XLA_FLAGS={_FLAG}="
        f"{NUM_DEVICES} (a module collected earlier in this process ran a JAX computation at "
        f"import). Set XLA_FLAGS={_FLAG}={NUM_DEVICES} in the environment or in a top-level "
        f"tests/conftest.py.", pytrace=False)
