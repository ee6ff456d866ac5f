"""How many visual tokens ``keep`` leaves: one rule for export validation, pruning and the runtime (no torch)."""
from __future__ import annotations

import math
import numbers


def keep_count(num_tokens: int, keep: float | int) -> int:
    """Number of tokens to keep out of ``num_tokens``.

    ``keep`` is either a ratio (a float in (0, 1]: ``max(1, round(keep * num_tokens))``, halves rounded up) or a
    token budget (an int in [1, num_tokens]). ``1.0`` keeps everything; ``1`` keeps one token.
    """
    if not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a ratio in (0, 1] (float) or a token budget in [1, {num_tokens}] (int), "
                        f"got {keep!r} of type {type(keep).__name__}")
    if isinstance(keep, numbers.Integral):
        if not 1 <= keep <= num_tokens:
            raise ValueError(f"keep={keep} tokens is outside [1, {num_tokens}]; pass a budget in that range or a "
                             "ratio in (0, 1] as a float (e.g. 0.25)")
        return int(keep)
    keep = float(keep)
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep ratio {keep} is outside (0, 1]; pass a ratio such as 0.25, or a token budget as "
                         f"an int in [1, {num_tokens}]")
    return max(1, min(num_tokens, math.floor(keep * num_tokens + 0.5)))
