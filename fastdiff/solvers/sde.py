"""Score-SDE samplers: reverse-SDE Euler-Maruyama and predictor-corrector (Song et al. 2021, Algorithms 2-5),
and annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

Forward SDE of a schedule: dx = f(t) x dt + g(t) dw with f = alpha'/alpha and g^2 = d sigma^2/dt - 2 f sigma^2
(VP: f = -beta/2, g^2 = beta; VE: f = 0, g^2 = d sigma^2/dt; sub-VP: g^2 = beta (1 - alpha^4)).
Reverse SDE: dx = [f x - g^2 score] dt + g dw_bar, score = (alpha D - x) / sigma^2.
The last step returns the mean (Song's noise removal); a step to the clean point returns D (Tweedie).
"""

import math

from .registry import MAX_STAGES, Option, _count, _one_of, _positive, solver


def drift_diffusion(schedule, t):
    a, s = schedule.alpha(t), schedule.sigma(t)
    f = schedule.dalpha(t) / a
    g2 = 2.0 * s * schedule.dsigma(t) - 2.0 * f * s * s
    return f, g2


def score(X, D, alpha, sigma):
    return (alpha * D - X) / (sigma * sigma)


@solver("euler_maruyama")
def euler_maruyama(b, g):
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        dt = g.t[i] - g.t[i + 1]  # > 0: time runs backwards
        f, g2 = drift_diffusion(g.schedule, g.t[i])
        x_mean = X - dt * (f * X - g2 * score(X, D, g.alpha[i], g.sigma[i]))
        last = i == g.steps - 1
        b.update(x=x_mean, noise=0.0 if last else math.sqrt(g2 * dt))


def langevin_stage(b, t, alpha, sigma, snr, r):
    """One corrector step at t: x += eps s + sqrt(2 eps) z, eps = 2 r (snr ||z|| / ||s||)^2 (Algorithm 4)."""
    X, D = b.call(t)
    b.update(x=X, langevin=(snr, r, -1.0 / (sigma * sigma), alpha / (sigma * sigma)))


@solver("pc", alpha_zero=True,
        predictor=Option("reverse_diffusion", _one_of("reverse_diffusion", "euler_maruyama"),
                         "predictor must be 'reverse_diffusion' or 'euler_maruyama'"),
        snr=Option(0.16, _positive, "snr must be > 0"),
        corrector_steps=Option(1, _count, f"corrector_steps must be an integer in 1..{MAX_STAGES}"))
def pc(b, g, predictor, snr, corrector_steps):
    """Predictor-corrector: Langevin corrector steps at t_i, then a predictor step t_i -> t_{i+1}."""
    b.expect(g.steps * (corrector_steps + 1))
    for i in b.steps(g.steps):
        a, s, a2, s2 = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        r = (a / a2) ** 2  # Song's alpha_i = 1 - beta_i for VP (= alpha_bar_i / alpha_bar_{i-1}); 1 for VE
        for _ in range(corrector_steps):
            langevin_stage(b, g.t[i], a, s, snr, r)
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        last = i == g.steps - 1
        if predictor == "reverse_diffusion":
            # Discretized reverse of x_t = a x_t' + G z (Song's ReverseDiffusionPredictor, App. E).
            a_ts = a / a2
            G2 = s * s - a_ts * a_ts * s2 * s2
            x_mean = (2.0 - a_ts) * X + G2 * score(X, D, a, s)
            b.update(x=x_mean, noise=0.0 if last else math.sqrt(G2))
        else:
            dt = g.t[i] - g.t[i + 1]
            f, g2 = drift_diffusion(g.schedule, g.t[i])
            b.update(x=X - dt * (f * X - g2 * score(X, D, a, s)), noise=0.0 if last else math.sqrt(g2 * dt))


@solver("annealed_langevin", alpha_zero=True,
        step_size=Option(2e-5, _positive, "step_size (epsilon of NCSN) must be > 0"),
        corrector_steps=Option(100, _count, f"corrector_steps (T of NCSN) must be an integer in 1..{MAX_STAGES}"))
def annealed_langevin(b, g, step_size, corrector_steps):
    """NCSN: T Langevin steps at each level t_1..t_N with alpha_i = eps sigma_i^2 / sigma_L^2.

    Step i moves the sample to level t_{i+1}; a final clean point is one denoising call at the last level.
    """
    b.expect((g.steps - 1) * corrector_steps + 1)
    levels = [i for i in range(1, g.steps + 1) if not g.zero[i]]
    sigma_L = g.sigma[levels[-1]] if levels else 1.0
    for i in b.steps(g.steps, start=1):
        if g.zero[i]:
            X, D = b.call(g.t[i - 1])
            b.update(x=D)
            continue
        a, s = g.alpha[i], g.sigma[i]
        step = step_size * (s / sigma_L) ** 2
        for _ in range(corrector_steps):
            X, D = b.call(g.t[i])
            b.update(x=X + (step / 2) * score(X, D, a, s), noise=math.sqrt(step))
