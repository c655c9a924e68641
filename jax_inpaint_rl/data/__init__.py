"""Datasets as sources of host-side examples, and the loader that batches them.

See formats.py (example keys, source fields, local formats), sources.py (any path
-> source), loader.py (batch keys, order, sharding, resume), masks.py (mask
convention), synthetic.py, tfds_builder.py and validate.py + check.py
(`python -m jax_inpaint_rl.data.check PATH`).
"""
from jax_inpaint_rl.data.formats import DataError
from jax_inpaint_rl.data.loader import Loader, loaders_from_config
from jax_inpaint_rl.data.sources import open_source
from jax_inpaint_rl.data.synthetic import SyntheticSource
from jax_inpaint_rl.data.validate import find_problems

__all__ = ["DataError", "Loader", "SyntheticSource", "find_problems", "loaders_from_config", "open_source"]
