"""Solvers: each is a function that drives a ``Builder`` (``solvers/builder.py``) over a ``Grid`` of step boundaries.

One module per family registers its solvers with ``registry.solver``: options with defaults and validators (unknown
or out-of-range options fail with a message that lists what is allowed) and whether it runs where alpha = 0 (flows,
zero terminal SNR at t_max).  Solver math never touches tensors of data.
"""

from __future__ import annotations

import numpy as np

from . import adams, consistency, ddpm, dpm_solver, exponential, flow, ode, sa_solver, sde, unipc  # noqa: F401  (register)
from . import ancestral, exp_sde, sigma_ode  # noqa: F401
from .builder import Builder, Grid, OutOfRange, StageLimit
from .registry import (GUIDANCE_MODES, MAX_STAGES, SOLVERS, alpha_zero_error, alpha_zero_solvers,  # noqa: F401
                       cfgpp_solvers, check_options, solver_options)


def build(name, schedule, prediction, times, final, opts, cfgpp=False):
    """Run solver ``name`` over the grid ``times`` (its CFG++ variant with ``cfgpp``): returns (stages, num_slots,
    options used)."""
    spec = SOLVERS[name]
    used = check_options(name, opts)
    grid = Grid(schedule, times, final)
    b = Builder(schedule, prediction, max_stages=MAX_STAGES, cfgpp=cfgpp)
    try:
        b.expect(grid.steps)
        with np.errstate(all="ignore"):  # infinities are caught by Plan's finiteness check with a clear message
            spec.fn(b, grid, **used)
    except StageLimit:
        raise ValueError(
            f"solver {name!r} with {grid.steps} steps and options {used} needs more than {MAX_STAGES} stages (the "
            "cap on one plan): use fewer steps or corrector steps") from None
    except (ZeroDivisionError, OverflowError, OutOfRange) as e:
        raise alpha_zero_error(name, schedule, grid.t, e) from None
    return b.stages, b.num_slots, used


__all__ = ["SOLVERS", "solver_options", "build", "Grid", "alpha_zero_solvers", "cfgpp_solvers", "GUIDANCE_MODES",
           "MAX_STAGES"]
