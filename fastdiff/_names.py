"""Errors for unknown names (solvers, spacings, predictions, backends, options), with "did you mean" hints."""

from __future__ import annotations

import difflib


def unknown_name(kind: str, name, choices) -> ValueError:
    """A ValueError for ``name`` not among ``choices``: names the closest matches, then lists every choice.

    ``unknown_name("solver", "dpmpp2m", SOLVERS)`` says: unknown solver 'dpmpp2m'; did you mean 'dpmpp_2m'?
    (choose one of ...).  Returned, not raised, so callers write ``raise unknown_name(...)``.
    """
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.6) if isinstance(name, str) else []
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (choose one of: {', '.join(choices)})")
