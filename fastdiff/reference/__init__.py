"""Float64 reference samplers written literally from the papers.

They are the independent check on the coefficient rows of ``fastdiff.solvers`` / ``fastdiff.plan``, so they never
import the Plan machinery: each algorithm calls the model, converts its output to what the paper's update needs
(eps, x0, score or velocity) and updates tensors, in the paper's own variables.  Shared with fastdiff are only the
schedule (alpha, sigma, lambda and their inverses) and the time grid (``fastdiff.timesteps``).

    x = fastdiff.reference.sample(model, "heun", schedules.EDM(), 18, x_T, noises=[...])
    x = fastdiff.reference.sample_cfgpp(cond_model, uncond_model, 1.5, "euler", schedules.EDM(), 18, x_T)
"""

from __future__ import annotations

import inspect

import torch

from . import adams as _adams
from . import ancestral as _ancestral
from . import consistency as _consistency
from . import ddpm as _ddpm
from . import dpm_solver as _dpm
from . import exp_sde as _exp_sde
from . import exponential as _exponential
from . import flow as _flow
from . import guidance as _guidance
from . import ode as _ode
from . import sa_solver as _sa_solver
from . import sde as _sde
from . import sigma_ode as _sigma_ode
from ..timesteps import SPACING_OPTIONS as _SPACING_OPTIONS
from ._common import Grid, Run

__all__ = ["sample", "sample_cfgpp", "REFERENCES", "CFGPP_REFERENCES", "options"]

# solver name -> fn(guided_run, x, **options): the CFG++ variants (Chung et al. 2024, ComfyUI's *_cfg_pp samplers)
CFGPP_REFERENCES = _guidance.CFGPP_REFERENCES

# solver name -> fn(run, x, **options); unipc has no entry (it is checked against diffusers).
REFERENCES = {
    "ddpm": _ddpm.ddpm,
    "ddim": _ddpm.ddim,
    "euler": _ode.euler,
    "heun": _ode.heun,
    "dpm_2": _ode.dpm_2,
    "rk4": _ode.rk4,
    "lms": _ode.lms,
    "euler_ancestral": _ode.euler_ancestral,
    "euler_maruyama": _sde.euler_maruyama,
    "pc": _sde.pc,
    "annealed_langevin": _sde.annealed_langevin,
    "dpm_solver_1": _dpm.dpm_solver_1,
    "dpm_solver_2": _dpm.dpm_solver_2,
    "dpm_solver_3": _dpm.dpm_solver_3,
    "dpmpp_2m": _dpm.dpmpp_2m,
    "dpmpp_3m": _dpm.dpmpp_3m,
    "dpmpp_2m_sde": _dpm.dpmpp_2m_sde,
    "dpmpp_3m_sde": _dpm.dpmpp_3m_sde,
    "dpmpp_2s_ancestral": _dpm.dpmpp_2s_ancestral,
    "dpm_solver_singlestep": _dpm.dpm_solver_singlestep,
    "dpm_solver_multistep": _dpm.dpm_solver_multistep,
    "lcm": _consistency.lcm,
    "flow_euler": _flow.flow_euler,
    "flow_heun": _flow.flow_heun,
    "dpm_2_ancestral": _ancestral.dpm_2_ancestral,
    "flow_euler_ancestral": _ancestral.flow_euler_ancestral,
    "tcd": _ancestral.tcd,
    "dpmpp_sde": _exp_sde.dpmpp_sde,
    "seeds_2": _exp_sde.seeds_2,
    "seeds_3": _exp_sde.seeds_3,
    "er_sde": _exp_sde.er_sde,
    "heunpp2": _sigma_ode.heunpp2,
    "gradient_estimation": _sigma_ode.gradient_estimation,
    "ipndm": _adams.ipndm,
    "ipndm_v": _adams.ipndm_v,
    "deis": _adams.deis,
    "deis_logrho": _adams.deis_logrho,
    "plms": _adams.plms,
    "pndm": _adams.pndm,
    "res_multistep": _exponential.res_multistep,
    "res_multistep_ancestral": _exponential.res_multistep_ancestral,
    "dpm_fast": _exponential.dpm_fast,
    "sa_solver": _sa_solver.sa_solver,
    "sa_solver_pece": _sa_solver.sa_solver_pece,
}


def options(solver: str) -> dict:
    """The options of a reference solver and their defaults."""
    return _options_of(REFERENCES, solver, "reference")


def _options_of(table, solver, what) -> dict:
    if not isinstance(solver, str) or solver not in table:
        raise ValueError(f"no {what} for solver {solver!r}; they exist for {', '.join(sorted(table))}")
    sig = inspect.signature(table[solver])
    return {k: p.default for k, p in list(sig.parameters.items())[2:]}


def _checked_start(table, what, solver, schedule, steps, x_T, spacing, final, timesteps, sigmas, options_):
    """Check a reference call's solver, options and x_T (``options_`` loses the spacing options); -> (grid, x)."""
    allowed = _options_of(table, solver, what)
    spacing_opts = {k: options_.pop(k) for k in _SPACING_OPTIONS if k in options_}
    unknown = sorted(set(options_) - set(allowed))
    if unknown:
        raise ValueError(f"{what} {solver!r} has no option(s) {', '.join(unknown)}; its options: {allowed}")
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1:
        raise ValueError("x_T must be a tensor [B, ...]")
    return Grid(schedule, steps, spacing, final, timesteps, sigmas, spacing_opts), x_T.to(torch.float64)


def sample(model, solver, schedule, steps, x_T, noises=None, prediction="epsilon", spacing=None, final="zero",
           timesteps=None, sigmas=None, **options_) -> torch.Tensor:
    """Run the float64 reference of ``solver`` from ``x_T``.

    Parameters
    ----------
    model : callable
        ``model(x [B, ...] float64, t [B] float64) -> out``, t the schedule's model time, out in ``prediction``.
    solver : str
        A key of ``REFERENCES``.
    schedule : fastdiff.schedules.Schedule
    steps : int
        Solver steps (None with ``timesteps`` / ``sigmas``).
    x_T : Tensor [B, ...]
        Start state at the first boundary (used as is).
    noises : sequence of Tensor [B, ...], optional
        Fresh N(0, I) draws, consumed in order, one per draw of the algorithm; too few raises ValueError.
    prediction : {"epsilon", "x0", "v", "score", "flow"}
    spacing, final, timesteps, sigmas
        The time grid, as in ``fastdiff.plan`` (``rho`` and ``steps_offset`` may be given in ``options_``).
    **options_
        Solver options (``options(solver)`` lists them).

    Returns
    -------
    Tensor [B, ...] float64.
    """
    grid, x = _checked_start(REFERENCES, "reference", solver, schedule, steps, x_T, spacing, final, timesteps,
                             sigmas, options_)
    run = Run(model, schedule, prediction, grid, noises, x.shape[0])
    return REFERENCES[solver](run, x, **options_)


def sample_cfgpp(cond_model, uncond_model, guidance_scale, solver, schedule, steps, x_T, noises=None,
                 prediction="epsilon", spacing=None, final="zero", timesteps=None, sigmas=None,
                 **options_) -> torch.Tensor:
    """Run the float64 CFG++ reference of ``solver`` from ``x_T`` with guided estimate D = U + w (C - U).

    Parameters
    ----------
    cond_model, uncond_model : callable
        ``model(x [B, ...] float64, t [B] float64) -> out`` in ``prediction``: the conditional and unconditional
        model (each is called once per stage).
    guidance_scale : float
        The guidance weight w.
    solver : str
        A key of ``CFGPP_REFERENCES``.
    schedule, steps, x_T, noises, prediction, spacing, final, timesteps, sigmas, **options_
        As for ``sample``.

    Returns
    -------
    Tensor [B, ...] float64.
    """
    grid, x = _checked_start(CFGPP_REFERENCES, "CFG++ reference", solver, schedule, steps, x_T, spacing, final,
                             timesteps, sigmas, options_)
    u_run = Run(uncond_model, schedule, prediction, grid, noises, x.shape[0])
    c_run = Run(cond_model, schedule, prediction, grid, None, x.shape[0])
    return CFGPP_REFERENCES[solver](_guidance.GuidedRun(u_run, c_run, guidance_scale), x, **options_)
