"""Import a script (an example or a benchmark) by path, as the tests of those scripts need."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType


def load_script(path: pathlib.Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
