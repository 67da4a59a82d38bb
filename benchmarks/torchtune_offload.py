"""torchtune's ``OffloadActivations`` (eager activation offloading with a copy stream), loaded from a
torchtune wheel for the ``eager_torchtune_offload`` regime of bench_memory.py (issue 19 asks to be
measured against it in the same run).

Why not ``import torchtune``: the package's ``__init__`` imports its datasets, models and torchao,
none of which the GPU machine has (and it cannot reach a package index).  The class itself needs
only torch and psutil: ``torchtune/training/_activation_offloading.py`` also imports torchao's
``NF4Tensor`` (an ``isinstance`` check for quantised weights), ``torchtune.modules.TiedLinear`` and
torchtune's logger (both used by a helper, not by the class).  So this module reads that one file
out of the wheel and runs it with stand-ins for those three names (and for psutil where it is
missing); no torchtune code is copied into this repository.  Get the wheel where a package index
is reachable: ``pip download torchtune==0.6.1 --no-deps -d vendor/`` (a path git ignores), and pass
``--torchtune-wheel vendor/torchtune-0.6.1-py3-none-any.whl`` (or set ``VELORA_TORCHTUNE_WHEEL``).
"""
from __future__ import annotations

import logging
import os
import sys
import types
import zipfile

MODULE_PATH = "torchtune/training/_activation_offloading.py"
ENV = "VELORA_TORCHTUNE_WHEEL"

__all__ = ["MODULE_PATH", "ENV", "load_offload_activations", "wheel_path"]


def wheel_path(given: str | None) -> str | None:
    """The wheel to load: ``given``, else ``$VELORA_TORCHTUNE_WHEEL``, else None."""
    return given or os.environ.get(ENV) or None


def load_offload_activations(wheel: str):
    """``OffloadActivations`` from the torchtune wheel at ``wheel`` (its module runs with stand-ins
    for the imports the class does not use; ``sys.modules`` is left as it was)."""
    if not os.path.isfile(wheel):
        raise FileNotFoundError(f"torchtune wheel not found: {wheel!r} (see benchmarks/torchtune_offload.py)")
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.read(MODULE_PATH).decode()
        except KeyError:
            raise ValueError(f"{wheel!r} has no {MODULE_PATH}: not a torchtune wheel with OffloadActivations") \
                from None
    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        module = types.ModuleType("torchtune.training._activation_offloading")
        module.__file__ = f"{wheel}/{MODULE_PATH}"
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - a pinned wheel's module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module.OffloadActivations


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules for the names the offloading module imports but the class never needs for dense tensors."""
    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    class NF4Tensor:  # nothing is an instance: no activation is an NF4 weight
        pass

    class TiedLinear:
        pass

    out = {
        "torchao": module("torchao", __version__="0.0.0", __path__=[]),
        "torchao.dtypes": module("torchao.dtypes", __path__=[]),
        "torchao.dtypes.nf4tensor": module("torchao.dtypes.nf4tensor", NF4Tensor=NF4Tensor),
        "torchtune": module("torchtune", __path__=[]),
        "torchtune.modules": module("torchtune.modules", TiedLinear=TiedLinear),
        "torchtune.utils": module("torchtune.utils", get_logger=lambda level="INFO": logging.getLogger("torchtune")),
    }
    try:
        import psutil  # noqa: F401
    except ImportError:  # used only to warn when host memory is over 60 % used
        out["psutil"] = module("psutil", virtual_memory=lambda: types.SimpleNamespace(percent=0.0))
    return out
