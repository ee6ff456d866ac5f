"""The few transformers API differences across the versions vlmx supports, in one place.

transformers 5.24 renamed the cache argument of every model ``forward`` from ``past_key_values`` to ``cache``
(the old name still works, with a deprecation warning, until 5.40) and the output field with it. Code that hands a
cache to a transformers model goes through :func:`cache_kwargs`; code that reads one back uses the ``Cache`` object
it passed in (updated in place) or :func:`output_cache`.
"""
from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_arg_name(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model.forward`` takes."""
    return {_cache_arg_name(type(model).forward): cache}


def output_cache(output):
    """The cache returned in a transformers model output (``cache`` or ``past_key_values``), or None."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
