"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance") in float64, written from
ComfyUI's k-diffusion samplers ``sample_euler_cfg_pp``, ``sample_euler_ancestral_cfg_pp``, ``sample_dpmpp_2m_cfg_pp``,
``sample_dpmpp_2s_ancestral_cfg_pp``, ``res_multistep(cfg_pp=True)`` and ``sample_gradient_estimation_cfg_pp``.

Every call evaluates the unconditional and the conditional model; D = U + w (C - U) is the guided data estimate
and U the unconditional one.  CFG++ denoises with D but renoises (the direction back to the next noise level) with
U.  The algorithms run in k-diffusion's variables y = x / alpha, s = sigma / alpha (lambda = -log s), which on EDM's
schedule (alpha = 1) is ComfyUI's code letter for letter; the model gets x = alpha y.  Nothing here knows about
Plans or coefficient rows.
"""

from __future__ import annotations

import math

from .dpm_solver import step_orders
from .ode import ancestral_step, point_at_s


class GuidedRun:
    """A pair of runs (unconditional, conditional) of one grid and noise list, and the guidance weight w."""

    def __init__(self, uncond_run, cond_run, guidance_scale):
        self.u, self.c, self.w = uncond_run, cond_run, float(guidance_scale)
        self.grid, self.schedule = uncond_run.grid, uncond_run.schedule

    def eval(self, x, t, alpha=None, sigma=None):
        """(D, U): the guided and the unconditional data estimates at schedule time t."""
        U = self.u.eval(x, t, alpha, sigma).x0
        C = self.c.eval(x, t, alpha, sigma).x0
        return U + self.w * (C - U), U

    def noise(self, like):
        return self.u.noise(like)


def _y(x, alpha, name):
    if alpha == 0:
        raise ValueError(f"reference {name}: alpha = 0 at a step start (s = inf); start below it")
    return x / alpha


def euler_ancestral(run, x, eta=1.0, s_noise=1.0):
    """sample_euler_ancestral_cfg_pp: d = (y - U) / s, y' = D + sigma_down d, plus sigma_up noise; the step to the
    clean point returns D."""
    g = run.grid
    for i in range(g.steps):
        D, U = run.eval(x, g.t[i])
        if g.s[i + 1] == 0:
            x = D
            continue
        y = _y(x, g.alpha[i], "euler_ancestral cfg++")
        d = (y - U) / g.s[i]
        down, up = ancestral_step(g.s[i], g.s[i + 1], eta)
        y_next = D + down * d
        if up * s_noise > 0:
            y_next = y_next + (s_noise * up) * run.noise(x)
        x = g.alpha[i + 1] * y_next
    return x


def euler(run, x):
    """sample_euler_cfg_pp: the ancestral sampler with eta = 0, y' = D + s_{i+1} (y - U) / s_i."""
    return euler_ancestral(run, x, eta=0.0, s_noise=0.0)


def dpmpp_2m(run, x, lower_order_final=True, solver_type="midpoint", euler_at_final=False):
    """sample_dpmpp_2m_cfg_pp: y' = D + mix + e^{-h} y with mix = -e^{-h} U on first-order steps and
    mix = -e^{-h} U - expm1(-h) / (2 r) (D - U_prev), r = h_last / h, otherwise.  ComfyUI's sampler takes the first
    step and the step to the clean point at first order (``lower_order_final=False``); the options give the orders
    of fastdiff's dpmpp_2m (diffusers' rule)."""
    if solver_type != "midpoint":
        raise ValueError("reference dpmpp_2m cfg++: only solver_type='midpoint' (ComfyUI's form)")
    g = run.grid
    orders = step_orders(g, 2, lower_order_final, euler_at_final)
    U_prev = None
    for i in range(g.steps):
        D, U = run.eval(x, g.t[i])
        y = _y(x, g.alpha[i], "dpmpp_2m cfg++")
        e = g.s[i + 1] / g.s[i]  # e^{-h}, h = lambda_{i+1} - lambda_i; 0 at the clean point
        mix = -e * U
        if orders[i] == 2:
            h = math.log(g.s[i] / g.s[i + 1])
            r = math.log(g.s[i - 1] / g.s[i]) / h
            mix = mix - math.expm1(-h) * (1.0 / (2.0 * r)) * (D - U_prev)
        x = g.alpha[i + 1] * (D + mix + e * y)
        U_prev = U
    return x


def dpmpp_2s_ancestral(run, x, eta=1.0, s_noise=1.0):
    """sample_dpmpp_2s_ancestral_cfg_pp: both stages renoise from y + D - U (the midpoint's own U is not used)."""
    g, sch = run.grid, run.schedule
    for i in range(g.steps):
        D, U = run.eval(x, g.t[i])
        s_i = g.s[i]
        down, up = ancestral_step(s_i, g.s[i + 1], eta)
        if down == 0:
            y_next = D  # D + d * sigma_down with sigma_down = 0
        else:
            y = _y(x, g.alpha[i], "dpmpp_2s_ancestral cfg++")
            h = math.log(s_i / down)  # t_next - t with t = -log sigma
            s_mid = s_i * math.exp(-0.5 * h)
            y_pp = y + (D - U)
            y_2 = (s_mid / s_i) * y_pp - math.expm1(-0.5 * h) * D
            t_mid, a_mid, sg_mid = point_at_s(sch, s_mid)
            D_2, _ = run.eval(a_mid * y_2, t_mid, a_mid, sg_mid)
            y_next = (down / s_i) * y_pp - math.expm1(-h) * D_2
        if g.s[i + 1] > 0 and up * s_noise > 0:
            y_next = y_next + (s_noise * up) * run.noise(x)
        x = g.alpha[i + 1] * y_next
    return x


def _phi1(z):
    return math.expm1(z) / z


def _phi2(z):
    return (_phi1(z) - 1.0) / z


def res_multistep_ancestral(run, x, eta=1.0, s_noise=1.0):
    """res_multistep(cfg_pp=True): Euler (y' = D + sigma_down (y - U) / s) on the first step and to sigma_down = 0,
    else y' = e^{-h} (y + D - U) + h (b1 U + b2 U_prev), b2 = phi_2(-h) / c2, b1 = phi_1(-h) - b2,
    c2 = (lambda_{i-1} - lambda(previous sigma_down)) / h; then sigma_up noise."""
    g = run.grid
    U_prev, prev_down = None, None
    for i in range(g.steps):
        D, U = run.eval(x, g.t[i])
        s_i = g.s[i]
        down, up = ancestral_step(s_i, g.s[i + 1], eta)
        y = _y(x, g.alpha[i], "res_multistep cfg++")
        if down == 0 or U_prev is None:
            y_next = D + down * ((y - U) / s_i)
        else:
            t, t_old, t_next, t_prev = -math.log(s_i), -math.log(prev_down), -math.log(down), -math.log(g.s[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b2 = _phi2(-h) / c2
            b1 = _phi1(-h) - b2
            y_next = math.exp(-h) * (y + (D - U)) + h * (b1 * U + b2 * U_prev)
        if g.s[i + 1] > 0 and up * s_noise > 0:
            y_next = y_next + (s_noise * up) * run.noise(x)
        x = g.alpha[i + 1] * y_next
        U_prev, prev_down = U, down
    return x


def res_multistep(run, x):
    """sample_res_multistep_cfg_pp: res_multistep with eta = 0."""
    return res_multistep_ancestral(run, x, eta=0.0, s_noise=1.0)


def gradient_estimation(run, x, ge_gamma=2.0):
    """sample_gradient_estimation_cfg_pp: d = (y - U) / s, y' = D + s_{i+1} d, plus (gamma - 1)(d - d_prev)
    (s_{i+1} - s_i) from the second step on; the step to the clean point returns D."""
    g = run.grid
    d_prev = None
    for i in range(g.steps):
        D, U = run.eval(x, g.t[i])
        y = _y(x, g.alpha[i], "gradient_estimation cfg++")
        d = (y - U) / g.s[i]
        if g.s[i + 1] == 0:
            y_next = D
        else:
            y_next = D + g.s[i + 1] * d
            if i >= 1:
                y_next = y_next + ((ge_gamma - 1.0) * (g.s[i + 1] - g.s[i])) * (d - d_prev)
        d_prev = d
        x = g.alpha[i + 1] * y_next
    return x


CFGPP_REFERENCES = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "res_multistep": res_multistep,
    "res_multistep_ancestral": res_multistep_ancestral,
    "gradient_estimation": gradient_estimation,
}
