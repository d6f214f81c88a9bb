import os

import jax
from hypothesis import settings

# 8 virtual CPU devices for the multi-device ring tests (tests/test_ring.py), requested before anything runs a jax
# operation: pytest imports this file before any test module, in each pytest-xdist worker too. Unsharded arrays
# still live on the first device, so every other test runs as on one device. A device count chosen in the
# environment (JAX_NUM_CPU_DEVICES, or --xla_force_host_platform_device_count in XLA_FLAGS) wins; tests that need
# 8 devices skip when there are fewer.
CPU_DEVICES = 8
if "JAX_NUM_CPU_DEVICES" not in os.environ and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  try:
    jax.config.update("jax_num_cpu_devices", CPU_DEVICES)
  except AttributeError:   # a jax without the option: the XLA flag, read when the CPU backend starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={CPU_DEVICES}").strip()
  except RuntimeError:     # a plugin started a backend before this file ran: its device count stays
    pass

# Library code must never rely on implicit rank promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")

# CI runs a handful of examples per property; HYPOTHESIS_PROFILE=thorough runs many.
settings.register_profile("default", deadline=None, max_examples=10)
settings.register_profile("thorough", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


_CI_SLOW = os.path.join(os.path.dirname(__file__), "ci_slow.txt")


def pytest_collection_modifyitems(config, items):
  """Marks the node ids listed in tests/ci_slow.txt as ``slow`` (measured slowest; they run under -m slow)."""
  import pytest
  with open(_CI_SLOW) as f:
    slow = {line.strip() for line in f if line.strip() and not line.startswith("#")}
  for item in items:
    if item.nodeid in slow:
      item.add_marker(pytest.mark.slow)
