"""Demo and test models: exact denoisers of Gaussian data (the oracles of DESIGN §6)."""

from .gaussian import GaussianMixture

__all__ = ["GaussianMixture"]
