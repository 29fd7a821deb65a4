"""Backends by name, imported only when used.

A backend is registered as a dotted path ``"package.module:ClassName"`` plus
the extra that installs its library. Listing backends imports nothing heavier
than ``importlib.util.find_spec`` on each library.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str           # "module:Class"
    requires: tuple       # top-level modules the backend imports (e.g. ("faiss",))
    extra: str | None     # pip extra that installs them


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(name: str, target: str, requires=(), extra: str | None = None) -> None:
    """Make ``Memory(backend=name)`` build ``target``, a ``"module:Class"`` path.

    Third-party packages may register their own backends; a name registered
    again replaces the earlier entry.
    """
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _REGISTRY[name] = BackendEntry(name, target, tuple(requires), extra)


def available_backends() -> dict[str, bool]:
    """Every registered backend name, and whether its libraries are installed."""
    return {
        name: all(importlib.util.find_spec(mod) is not None for mod in entry.requires)
        for name, entry in _REGISTRY.items()
    }


def get_backend_class(name: str):
    """Import and return the class registered as ``name``."""
    try:
        entry = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"backend must be one of {sorted(_REGISTRY)}, got {name!r}"
        ) from None
    for mod in entry.requires:
        if importlib.util.find_spec(mod) is None:
            hint = f"pip install 'kvmemory[{entry.extra}]'" if entry.extra else f"pip install {mod}"
            raise ImportError(
                f"backend {name!r} needs the {mod!r} module, which is not installed: {hint}"
            )
    module_name, class_name = entry.target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
