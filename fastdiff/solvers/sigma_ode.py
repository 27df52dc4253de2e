"""More solvers of the PF-ODE dy/ds = (y - D) / s in k-diffusion's sigma space (y = x / alpha, s = sigma / alpha,
see ``ode.py``), as ComfyUI's menus offer them.

- ``heunpp2``: Heun++ (ComfyUI's sample_heunpp2): each step looks two boundaries ahead and averages the slopes at
  s_i, s_{i+1}, s_{i+2} with weights from the first sigma: w_2 = s_{i+1} / (3 s_0), w_3 = s_{i+2} / (3 s_0),
  w_1 = 1 - w_2 - w_3; the second-to-last step is Heun with w_2 = s_{i+1} / (2 s_0); the last is Euler.
- ``gradient_estimation``: Permenter & Yuan 2024's gradient-estimation sampler: the Euler step plus
  (gamma - 1) (d_i - d_{i-1}) (s_{i+1} - s_i), a second-order multistep correction (gamma = 2).
"""

import math

from .builder import eps_hat
from .ode import CHURN, churn, euler_to, slope_or_finish
from .registry import Option, _real, solver


@solver("heunpp2", **CHURN)
def heunpp2(b, g, **churn_opts):
    """ComfyUI's sample_heunpp2 (EDM's churn before each step when s_churn > 0)."""
    y_hat, d_acc = b.slot("y_hat"), b.slot("weighted d")
    s_0 = g.s[0]
    for i in b.steps(g.steps):
        s_hat, t_hat, a_hat, sg_hat = churn(b, g, i, **churn_opts)
        X, D = b.call(t_hat, a_hat, sg_hat)
        d = eps_hat(X, D, a_hat, sg_hat)
        a_1, s_1 = g.alpha[i + 1], g.s[i + 1]
        if i == g.steps - 1:  # Euler to the last boundary
            b.update(x=euler_to(D, d, a_1, s_1))
            continue
        dt = s_1 - s_hat
        y = X / a_hat
        if i == g.steps - 2:  # Heun with the two-point weighting
            w_2 = s_1 / (2.0 * s_0)
            b.update(x=a_1 * (y + dt * d), slots={y_hat: y, d_acc: (1.0 - w_2) * d})
            X, D = b.call(g.t[i + 1])
            b.update(x=a_1 * (y_hat + dt * (d_acc + w_2 * eps_hat(X, D, a_1, g.sigma[i + 1]))))
            continue
        # Heun++: Euler to s_{i+1}, Euler on to s_{i+2}, then the weighted slope from s_hat to s_{i+1}
        a_2, s_2 = g.alpha[i + 2], g.s[i + 2]
        w_2, w_3 = s_1 / (3.0 * s_0), s_2 / (3.0 * s_0)
        b.update(x=a_1 * (y + dt * d), slots={y_hat: y, d_acc: (1.0 - w_2 - w_3) * d})
        X, D = b.call(g.t[i + 1])
        d_2 = eps_hat(X, D, a_1, g.sigma[i + 1])
        b.update(x=a_2 * (X / a_1 + (s_2 - s_1) * d_2), slots={d_acc: d_acc + w_2 * d_2})
        X, D = b.call(g.t[i + 2])
        b.update(x=a_1 * (y_hat + dt * (d_acc + w_3 * eps_hat(X, D, a_2, g.sigma[i + 2]))))


@solver("gradient_estimation", alpha_zero=True, cfgpp=True,
        ge_gamma=Option(2.0, lambda v: _real(v) and math.isfinite(v),
                        "ge_gamma must be a finite real number (2: the paper's choice)"))
def gradient_estimation(b, g, ge_gamma):
    """Permenter & Yuan 2024 (ComfyUI's sample_gradient_estimation); a step to the clean point returns D.  The
    CFG++ variant takes the slopes d from U (``slope_or_finish``), as ComfyUI's sample_gradient_estimation_cfg_pp."""
    d_prev = b.slot("d_prev")
    for i in b.steps(g.steps):
        first = slope_or_finish(b, g, i)
        if first is None:
            continue
        X, D, d = first
        a_1, s_1 = g.alpha[i + 1], g.s[i + 1]
        y_next = euler_to(D, d, 1.0, s_1)  # y + (s_{i+1} - s_i) d, finite at alpha = 0
        if i >= 1:
            y_next = y_next + ((ge_gamma - 1.0) * (s_1 - g.s[i])) * (d - d_prev)
        b.update(x=a_1 * y_next, slots={d_prev: d})
