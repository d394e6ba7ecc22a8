"""Load user code named as `package.module:attribute` (models, datasets)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

from ps.errors import InvalidArgument


def _import(module_name: str) -> Any:
    """Import `module_name` from the Python path, else from the working directory. `python -m`
    puts the working directory on the path and installed console scripts do not: this makes
    `ps-launch --model mypkg.job:model` work where `python -m ps.cli.launch` does. The directory
    is searched last, so it never shadows an installed module."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        top = module_name.split(".")[0]
        if e.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def load_object(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"plugin ({spec!r}) must look like package.module:factory")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise InvalidArgument(f"plugin ({spec!r}): cannot import {module_name!r} from the Python path or the "
                              f"working directory ({os.getcwd()}): {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InvalidArgument(f"plugin ({spec!r}): {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_with_known(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """Call `factory` with those of `kwargs` its signature accepts (all, if it takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})
