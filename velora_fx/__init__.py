"""velora_fx: VeLoRA activation compression as a torch.compile backend (partition-aware)."""
from . import codecs as _codecs  # noqa: F401  (registers the codecs)
from . import reference  # noqa: F401
from ._compat import list_backends as _list_backends, register_backend as _register_backend
from .api import explain, transform
from .backend import VeloraBackend, backend, default_backend, velora_backend
from .config import ConfigError, VeloraConfig
from .report import Report
from .tracing import trace_joint

__all__ = ["backend", "transform", "explain", "reference", "trace_joint", "default_backend", "VeloraBackend",
           "VeloraConfig", "ConfigError", "Report"]
__version__ = "0.1.0"

from .integrations import causal_lm as _causal_lm  # noqa: E402
_causal_lm.install_when_imported()  # backend="velora" is built after dynamo traced: its head needs this done already

if "velora" not in _list_backends(exclude_tags=()):
    _register_backend(name="velora")(velora_backend)
