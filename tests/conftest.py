"""Test-session setup shared by every test module.

Multi-device code is tested on 8 simulated CPU devices. XLA reads the device count when the JAX
backend starts, so the flag is set here, before any test module imports jax (pytest imports this
file first, in every xdist worker)."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
