"""Load user code named as `package.module:attribute` (models, datasets)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from ps.errors import InvalidArgument


def load_object(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"plugin ({spec!r}) must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidArgument(f"plugin ({spec!r}): cannot import {module_name!r}: {e}") from e
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
