"""Score-SDE samplers (Song et al. 2021) and annealed Langevin dynamics (Song & Ermon 2019), with the score.

The forward SDE of a path x_t = alpha(t) x0 + sigma(t) eps is dx = f(t) x dt + g(t) dw with f = alpha'/alpha and
g^2 = d(sigma^2)/dt - 2 f sigma^2 (Song et al. 2021, App. B; VP: f = -beta/2, g^2 = beta; VE: g^2 = d sigma^2/dt);
the reverse SDE is dx = [f x - g^2 score] dt + g dw_bar.
"""

from __future__ import annotations

import math

import torch


def _f_g2(schedule, t):
    """Drift coefficient f(t) and squared diffusion g(t)^2 of the forward SDE."""
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    if a == 0:
        raise ValueError(f"reference: the SDE drift f = alpha'/alpha is infinite at t={t:g} (alpha = 0)")
    f = float(schedule.dalpha(t)) / a
    g2 = 2.0 * s * float(schedule.dsigma(t)) - 2.0 * f * s * s
    return f, g2


def _em_step(run, x, score, i, add_noise):
    """One Euler-Maruyama step of the reverse SDE from t_i to t_{i+1} (dt < 0), coefficients at t_i."""
    g = run.grid
    dt = g.t[i + 1] - g.t[i]
    f, g2 = _f_g2(run.schedule, g.t[i])
    # x_mean = x + [f x - g^2 score] dt
    x_mean = x + (f * x - g2 * score) * dt
    # x = x_mean + g sqrt(|dt|) z
    if add_noise and g2 * -dt > 0:
        return x_mean + math.sqrt(g2 * -dt) * run.noise(x)
    return x_mean


def euler_maruyama(run, x):
    """Song et al. 2021, reverse-SDE Euler-Maruyama (App. D/G, ``EulerMaruyamaPredictor``), x_mean at the end."""
    g = run.grid
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            # a step to the clean point returns D = E[x0 | x_t] (Tweedie)
            x = out.x0
            continue
        # no noise on the last step: Song's "noise removal", return x_mean
        x = _em_step(run, x, out.score, i, add_noise=i < g.steps - 1)
    return x


def _norm(v: torch.Tensor) -> torch.Tensor:
    """||v||_2 per sample over all non-batch elements, shaped to broadcast against v."""
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.dim() - 1))


def pc(run, x, predictor="reverse_diffusion", snr=0.16, corrector_steps=1):
    """Song et al. 2021, Algorithms 4-5 (PC sampling, VP) / 2-3 (VE): Langevin corrector, then the predictor.

    As in Song's ``pc_sampler`` the corrector runs first at each t_i, then the predictor t_i -> t_{i+1}; the Langevin
    step size uses per-sample norms (Song's code averages them over the batch; per sample keeps samples independent).
    """
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"pc: predictor must be 'reverse_diffusion' or 'euler_maruyama', got {predictor!r}")
    g = run.grid
    for i in range(g.steps):
        a_i, s_i, a_n, s_n = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        # Song's alpha_i: 1 - beta_i = alpha_bar_i / alpha_bar_{i-1} for VP, 1 for VE
        alpha_song = (a_i / a_n) ** 2
        for _ in range(corrector_steps):
            # Algorithm 4/5 corrector: g = s(x, t_i); z ~ N(0, I); eps = 2 alpha_i (r ||z|| / ||g||)^2, r = snr
            score = run.eval(x, g.t[i]).score
            z = run.noise(x)
            eps = 2.0 * alpha_song * (snr * _norm(z) / _norm(score)) ** 2
            # x = x + eps g + sqrt(2 eps) z
            x = x + eps * score + torch.sqrt(2.0 * eps) * z
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            x = out.x0  # the predictor step to the clean point returns D
            continue
        last = i == g.steps - 1
        if predictor == "reverse_diffusion":
            # Song App. E: discretize x_t = a x_t' + G z, a = alpha_i/alpha_{i+1}, G^2 = sigma_i^2 - a^2 sigma_{i+1}^2;
            # reverse: x' = x - f + G^2 s + G z with f = (a - 1) x
            a = a_i / a_n
            G2 = s_i**2 - a**2 * s_n**2
            x_mean = (2.0 - a) * x + G2 * out.score
            x = x_mean if last or G2 <= 0 else x_mean + math.sqrt(G2) * run.noise(x)
        else:
            x = _em_step(run, x, out.score, i, add_noise=not last)
    return x


def annealed_langevin(run, x, step_size=None, corrector_steps=100):
    """Song & Ermon 2019, Algorithm 1 (annealed Langevin dynamics) over the levels sigma_1 > .. > sigma_L.

    ``step_size`` None: the paper's epsilon = 2e-5, chosen for sigma_L = 0.01, kept in proportion to sigma_L^2.
    """
    g = run.grid
    levels = [i for i in range(1, g.steps + 1) if not g.clean[i]]
    sigma_L = g.sigma[levels[-1]] if levels else 1.0
    if step_size is None:
        step_size = 2e-5 * sigma_L**2 / 0.01**2
    for i in range(1, g.steps + 1):
        if g.clean[i]:
            # the clean point is not a noise level: one denoising call at the last level, return D
            x = run.eval(x, g.t[i - 1]).x0
            continue
        # alpha_i = epsilon sigma_i^2 / sigma_L^2
        alpha_i = step_size * g.sigma[i] ** 2 / sigma_L**2
        for _ in range(corrector_steps):
            # x_t = x_{t-1} + alpha_i / 2 s(x_{t-1}, sigma_i) + sqrt(alpha_i) z_t
            score = run.eval(x, g.t[i]).score
            z = run.noise(x)
            x = x + (alpha_i / 2) * score + math.sqrt(alpha_i) * z
    return x
