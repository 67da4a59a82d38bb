"""Codecs: what a compressed site saves in forward and rebuilds in backward."""
from .base import Codec, get_codec, register_codec  # noqa: F401
from . import fewbit as _fewbit, gated as _gated, rmm as _rmm, velora as _velora  # noqa: F401  (registers each codec by name)
