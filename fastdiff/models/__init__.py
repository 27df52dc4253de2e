"""Demo and test models: exact denoisers of Gaussian data (the exact oracles), the digits UNet
(``fastdiff.models.digits``), and EDM preconditioning as a wrapper."""

from .gaussian import GaussianMixture
from .precond import EDMPrecond, edm_scalings

__all__ = ["GaussianMixture", "EDMPrecond", "edm_scalings"]
