"""Exact denoisers for Gaussian-mixture data: closed-form models for any schedule and prediction.

For data x0 ~ sum_k w_k N(m_k, s_k^2 I) the perturbed x_t = alpha x0 + sigma n is a mixture of
N(alpha m_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, and the ideal denoiser is the posterior mean

    D(x, t) = sum_k pi_k(x) [m_k + alpha s_k^2 / v_k (x - alpha m_k)],   pi_k ∝ w_k N(x; alpha m_k, v_k I).

With one component the probability-flow ODE has the closed solution
x_t = alpha_t m + r_t / r_T (x_T - alpha_T m), r_t = sqrt(alpha_t^2 s^2 + sigma_t^2).
"""

from __future__ import annotations

import numpy as np
import torch

from ..plan import PREDICTIONS


class GaussianMixture:
    """Isotropic Gaussian mixture in data space.

    Parameters
    ----------
    means : array-like [K] or [K, *event_shape]
        Component means (scalars broadcast over the event).
    stds : array-like [K]
        Component standard deviations s_k.
    weights : array-like [K], optional
        Mixture weights (normalized); uniform by default.
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(np.asarray(means, dtype=np.float64))
        self.stds = torch.as_tensor(np.asarray(stds, dtype=np.float64)).reshape(-1)
        k = self.stds.numel()
        if self.means.shape[0] != k:
            raise ValueError(f"means has {self.means.shape[0]} components, stds has {k}")
        w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (k,) or np.any(w <= 0):
            raise ValueError("weights must be K positive numbers")
        self.weights = torch.as_tensor(w / w.sum())

    def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Posterior mean E[x0 | x_t = x] (float64 inside); alpha, sigma: floats or [B] tensors."""
        dtype = x.dtype
        x = x.double()
        B = x.shape[0]
        view = (B,) + (1,) * (x.dim() - 1)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).expand(B).reshape(view)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B).reshape(view)
        d = x[0].numel()
        logits, cond_means = [], []
        for k in range(self.stds.numel()):
            m = self.means[k].to(x.device)
            v = a * a * self.stds[k] ** 2 + s * s
            r = x - a * m
            sq = (r * r).reshape(B, -1).sum(1)
            vk = v.reshape(B)
            logits.append(torch.log(self.weights[k]) - 0.5 * sq / vk - 0.5 * d * torch.log(vk))
            cond_means.append(m + a * self.stds[k] ** 2 / v * r)
        pi = torch.softmax(torch.stack(logits, 1), dim=1)  # [B, K]
        D = sum(pi[:, k].reshape(view) * cond_means[k] for k in range(len(cond_means)))
        return D.to(dtype)

    def model(self, schedule, prediction: str = "epsilon"):
        """A model ``model(x, t) -> out`` (t: [B] model times) predicting ``prediction`` exactly."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")

        def model(x, t):
            ts = schedule.t_from_model_time(t.detach().double().cpu().numpy())
            view = (-1,) + (1,) * (x.dim() - 1)

            def col(v):
                return torch.as_tensor(np.asarray(v, dtype=np.float64), device=x.device).reshape(view)

            a, s = col(schedule.alpha(ts)), col(schedule.sigma(ts))
            D = self.denoise(x, a.reshape(-1), s.reshape(-1)).double()
            xd = x.double()
            if prediction == "x0":
                out = D
            else:
                eps = (xd - a * D) / s
                if prediction == "epsilon":
                    out = eps
                elif prediction == "v":
                    out = a * eps - s * D
                elif prediction == "score":
                    out = -eps / s
                else:  # flow: dx/d(model time)
                    out = (col(schedule.dalpha(ts)) * D + col(schedule.dsigma(ts)) * eps) / schedule.model_time_rate
            return out.to(x.dtype)

        return model

    def sample(self, n: int, event_shape=None, generator=None) -> torch.Tensor:
        """n exact samples of the data distribution, float64 [n, *event_shape] (default: the means' event shape)."""
        if event_shape is None:
            event_shape = tuple(self.means.shape[1:])
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        shape = (n,) + tuple(event_shape)
        z = torch.randn(shape, dtype=torch.float64, generator=generator)
        lead = (n,) + (1,) * (len(shape) - 1)
        m = self.means[comp]
        m = m.reshape(lead) if self.means.dim() == 1 else m
        return m + self.stds[comp].reshape(lead) * z

    def pf_ode_solution(self, x_T, alpha_T, sigma_T, alpha_t, sigma_t):
        """Closed-form probability-flow ODE map from (alpha_T, sigma_T) to (alpha_t, sigma_t); one component only."""
        if self.stds.numel() != 1:
            raise ValueError("the closed-form PF-ODE solution exists for a single Gaussian only")
        m, s2 = self.means[0], self.stds[0] ** 2
        r_T = (alpha_T**2 * s2 + sigma_T**2) ** 0.5
        r_t = (alpha_t**2 * s2 + sigma_t**2) ** 0.5
        return alpha_t * m + r_t / r_T * (x_T - alpha_T * m)
