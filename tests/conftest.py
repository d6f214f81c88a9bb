import os

import jax
from hypothesis import settings

# Library code must never rely on implicit rank promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")

# CI runs a handful of examples per property; HYPOTHESIS_PROFILE=thorough runs many.
settings.register_profile("default", deadline=None, max_examples=10)
settings.register_profile("thorough", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
