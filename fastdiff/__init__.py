"""fastdiff: fast, exact, reproducible diffusion-model sampling.

Solver math is float64 host code that compiles every sampler into per-stage coefficient rows (``fastdiff.plan``);
backends execute a row in one memory pass; Philox noise makes a seed's sample independent of batch and backend.

    import fastdiff as fd
    plan = fd.plan("dpmpp_2m", fd.schedules.DiscreteVP.scaled_linear(), steps=20)
    x = fd.sample(model, plan, shape=(4, 4, 64, 64), seeds=[1, 2, 3, 4])
"""

import importlib

from . import backends, rng, schedules
from .plan import PREDICTIONS, Plan, plan
from .sampler import Sampler, sample
from .solvers import SOLVERS as _SOLVER_TABLE
from .solvers import cfgpp_solvers, solver_options
from .timesteps import SPACINGS, timesteps

SOLVERS = tuple(sorted(_SOLVER_TABLE))
CFGPP_SOLVERS = tuple(sorted(cfgpp_solvers()))  # solvers with a guidance="cfg++" variant

__version__ = "0.1.0"

__all__ = ["backends", "rng", "schedules", "plan", "Plan", "sample", "Sampler", "timesteps", "SOLVERS", "SPACINGS",
           "PREDICTIONS", "CFGPP_SOLVERS", "solver_options", "__version__"]

# Public submodules imported on first access (``fd.models.GaussianMixture``), so ``import fastdiff`` stays light:
# several pull in optional dependencies (diffusers, scipy, fastapi) only when used.
_LAZY_SUBMODULES = ("distributed", "guidance", "integrations", "models", "ops", "reference", "serving", "thresholding")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it here: later lookups skip this
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
