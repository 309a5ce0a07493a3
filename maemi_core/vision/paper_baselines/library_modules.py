"""Modules of installed packages whose ``__init__`` cannot be imported here.

``vit-pytorch``'s package ``__init__`` imports its DINO wrapper, which needs torchvision (whose
compiled operators do not load beside the CPU torch the project pins); its model files need
only torch and einops. PyGCL's ``__init__`` imports DGL; its ``GCL.losses`` need only torch.
:func:`import_submodule` imports ``package.module`` with the package registered from its
folder but its ``__init__`` not run, so the package's own code is used as published, never
copied. A missing package raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

INSTALL_HINT = "install the baselines' extras: make baselines-deps (or scripts/install_baselines.sh)"


def import_submodule(package: str, module: str) -> types.ModuleType:
    """``package.module`` (dotted below the package allowed), without running ``package/__init__.py``."""
    name = f"{package}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    if package not in sys.modules or not getattr(sys.modules[package], "__path__", None):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"package {package!r} is not installed: {INSTALL_HINT}")
        shell = types.ModuleType(package)
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__file__ = str(Path(shell.__path__[0]) / "__init__.py")
        shell.__package__ = package
        sys.modules[package] = shell      # the package's folder, its __init__ not run
    return importlib.import_module(name)
