"""Stochastic exponential integrators with intermediate stages: DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``),
SEEDS-2 / SEEDS-3 (Gonzalez et al. 2023) and the ER-SDE solver (Cui et al. 2025), as ComfyUI runs them.

A stage's noise often continues an earlier stage's noise of the same step (correlated draws).  A stage draws one
fresh normal, so the earlier normal is recovered from the registers: stage k wrote x_k = mean_k + g_k z_k, and
mean_k is affine in values kept in slots, so z_k = (X - mean_k) / g_k is affine in the next stage's registers.
"""

import math

from .ode import ancestral_split
from .registry import ETA1, S_NOISE, Option, _count, _int_in, _one_of, _real, solver


def _fraction(v):
    return _real(v) and 0.0 < v <= 1.0


@solver("dpmpp_sde", eta=ETA1, s_noise=S_NOISE,
        r=Option(0.5, lambda v: _real(v) and 0.0 < v < 1.0, "r must be a number in (0, 1)"))
def dpmpp_sde(b, g, eta, s_noise, r):
    """k-diffusion's DPM-Solver++ (stochastic): an ancestral DPM-Solver++ step to the point at lambda_s + r h, the
    model there, and an ancestral step to the next boundary with D_d = (1 - 1/(2r)) D + 1/(2r) D_2 (k-diffusion's
    sigma space y = x / alpha, s = sigma / alpha).

    k-diffusion draws the two noises of a step from a Brownian tree W in its sigma tau: z_1 = (W(tau_1) - W(tau)) /
    sqrt(tau - tau_1) and z_2 = (W(tau') - W(tau)) / sqrt(tau - tau'), both N(0, I) with correlation
    rho = sqrt((tau - tau_1) / (tau - tau')), and independent across steps (disjoint intervals).  Here z_1 is a
    Philox draw and z_2 = rho z_1 + sqrt(1 - rho^2) w with a second Philox draw w: the same joint law, other numbers
    than torchsde's tree for a given seed.  tau is the sigma ComfyUI's tree runs on: s = sigma / alpha, and on a
    flow schedule the flow's sigma.
    """
    y_s, D_s = b.slot("y"), b.slot("D")
    fac = 1.0 / (2.0 * r)
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:  # k-diffusion's Euler step to sigma = 0: the data estimate
            b.update(x=D)
            continue
        s, s_next, a_next = g.s[i], g.s[i + 1], g.alpha[i + 1]
        s_1 = s * (s_next / s) ** r  # lambda_s + r h with lambda = -log s
        t_1, a_1, sg_1 = g.point_at_s(s_1)
        down_1, up_1 = ancestral_split(s, s_1, eta)
        down_2, up_2 = ancestral_split(s, s_next, eta)
        g_1, g_2 = up_1 * s_noise, up_2 * s_noise
        y = X / g.alpha[i]
        # DPM-Solver++(1) to sigma_down in y: (sd / s) y + (1 - sd / s) D, then noise up
        b.update(x=a_1 * ((down_1 / s) * y + (1.0 - down_1 / s) * D), slots={y_s: y, D_s: D}, noise=a_1 * g_1)
        X, D_2 = b.call(t_1, a_1, sg_1)
        y_next = (down_2 / s) * y_s + (1.0 - down_2 / s) * ((1.0 - fac) * D_s + fac * D_2)
        noise = 0.0
        if g_2 > 0:
            flow = g.schedule.kind == "flow"
            tau, tau_1, tau_next = (g.sigma[i], sg_1, g.sigma[i + 1]) if flow else (s, s_1, s_next)
            rho = math.sqrt((tau - tau_1) / (tau - tau_next))
            z_1 = (X / a_1 - (down_1 / s) * y_s - (1.0 - down_1 / s) * D_s) / g_1
            y_next = y_next + (g_2 * rho) * z_1
            noise = a_next * g_2 * math.sqrt(1.0 - rho * rho)
        b.update(x=a_next * y_next, noise=noise)


def _ei_phi_1(h):
    """h phi_1(h) = e^h - 1."""
    return math.expm1(h)


def _ei_phi_2(h):
    """h phi_2(h) = (e^h - 1 - h) / h."""
    return (math.expm1(h) - h) / h


class _SeedsStep:
    """The coefficients of one SEEDS step in x: points at lambda_s + c h, the data-prediction exponential
    integrator with h_eta = (1 + eta) h, and the chained noise (ComfyUI's sample_seeds_2 / _3)."""

    def __init__(self, g, i, eta):
        self.g, self.i, self.eta = g, i, eta
        self.h = g.lam[i + 1] - g.lam[i]
        self.h_eta = self.h * (1.0 + eta)

    def point(self, c):
        """(t, alpha, sigma) at lambda_s + c h (c = 1: the next boundary)."""
        g, i = self.g, self.i
        if c == 1.0:
            return g.t[i + 1], g.alpha[i + 1], g.sigma[i + 1]
        return g.point_at_s(g.s[i] * (g.s[i + 1] / g.s[i]) ** c)

    def x_coef(self, c, sigma_c):
        """Coefficient of x_s: (sigma_c / sigma_s) e^{-c h eta}."""
        return (sigma_c / self.g.sigma[self.i]) * math.exp(-c * self.h * self.eta)

    def noise_std(self, c):
        """sqrt(1 - e^{-2 c h eta}): the noise over [lambda_s, lambda_s + c h] in units of sigma_c."""
        return math.sqrt(-math.expm1(-2.0 * c * self.h * self.eta))

    def carry(self, c_from, c_to):
        """(e^{(c_from - c_to) h eta}, sqrt(1 - e^{2 (c_from - c_to) h eta})): how the noise of the earlier point
        continues, and the fresh part."""
        f = (c_from - c_to) * self.h * self.eta
        return math.exp(f), math.sqrt(-math.expm1(2.0 * f))

    def first_stage(self, b, X, D, c, s_noise, inject, slots):
        """Stage 1: exponential Euler from x_s to lambda_s + c h, plus noise sigma_c s_noise sqrt(1 - e^{-2 c h eta}) z
        when ``inject``.  Returns (point, cx, cd): the point (t, alpha, sigma) and the mean cx x_s - cd D."""
        t_c, a_c, sg_c = self.point(c)
        cx, cd = self.x_coef(c, sg_c), a_c * _ei_phi_1(-c * self.h_eta)
        noise = sg_c * s_noise * self.noise_std(c) if inject else 0.0
        b.update(x=cx * X - cd * D, slots=slots, noise=noise)
        return (t_c, a_c, sg_c), cx, cd

    def continue_noise(self, x_next, n_prev, c_from, c_to, sigma_to, s_noise):
        """x_next plus the noise of the point at c_from carried on to c_to (n_prev: that point's noise in units of
        its sigma s_noise), and the std of the fresh draw to add there."""
        keep, fresh = self.carry(c_from, c_to)
        return x_next + (sigma_to * s_noise * keep) * n_prev, sigma_to * s_noise * fresh


def _seeds_steps(b, g, eta, s_noise, r, x_s, D_s, finish):
    """The SEEDS step loop: the model at x; a step to the clean point returns D; else stage 1 to lambda_s + r h
    (x and D kept in slots ``x_s``, ``D_s``), the model there (D_2), and ``finish(st, D_2, n_1)`` closes the step's
    remaining stages, with n_1 = stage 1's noise in units of sigma_1 s_noise, sqrt(1 - e^{-2 r h eta}) z_1, as
    registers (None without noise)."""
    inject = eta > 0 and s_noise > 0
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        st = _SeedsStep(g, i, eta)
        (t_1, a_1, sg_1), c1x, c1d = st.first_stage(b, X, D, r, s_noise, inject, {x_s: X, D_s: D})
        X, D_2 = b.call(t_1, a_1, sg_1)
        finish(st, D_2, (X - c1x * x_s + c1d * D_s) / (sg_1 * s_noise) if inject else None)


R_OPTION = Option(0.5, _fraction, "r must be a number in (0, 1]")


@solver("seeds_2", eta=ETA1, s_noise=S_NOISE, r=R_OPTION,
        solver_type=Option("phi_1", _one_of("phi_1", "phi_2"), "solver_type must be 'phi_1' or 'phi_2'"))
def seeds_2(b, g, eta, s_noise, r, solver_type):
    """SEEDS-2 (data prediction, VP) as ComfyUI's sample_seeds_2: stage at lambda_s + r h, then the step with
    D_d = lerp(D, D_2, 1/(2r)) (phi_1) or the phi_2 weights.  eta = 0 is deterministic (exponential Heun with
    r = 1, phi_2)."""
    x_s, D_s = b.slot("x_s"), b.slot("D")

    def step_2(st, D_2, n_1):
        h_eta, a_t, sg_t = st.h_eta, g.alpha[st.i + 1], g.sigma[st.i + 1]
        if solver_type == "phi_1":
            fac = 1.0 / (2.0 * r)
            x_next = st.x_coef(1.0, sg_t) * x_s - (a_t * _ei_phi_1(-h_eta)) * ((1.0 - fac) * D_s + fac * D_2)
        else:
            b2 = _ei_phi_2(-h_eta) / r
            b1 = _ei_phi_1(-h_eta) - b2
            x_next = st.x_coef(1.0, sg_t) * x_s - a_t * (b1 * D_s + b2 * D_2)
        noise = 0.0
        if n_1 is not None:
            x_next, noise = st.continue_noise(x_next, n_1, r, 1.0, sg_t, s_noise)
        b.update(x=x_next, noise=noise)

    _seeds_steps(b, g, eta, s_noise, r, x_s, D_s, step_2)


@solver("seeds_3", eta=ETA1, s_noise=S_NOISE,
        r_1=Option(1.0 / 3.0, _fraction, "r_1 must be a number in (0, 1] below r_2"),
        r_2=Option(2.0 / 3.0, _fraction, "r_2 must be a number in (0, 1]"))
def seeds_3(b, g, eta, s_noise, r_1, r_2):
    """SEEDS-3 (data prediction, VP) as ComfyUI's sample_seeds_3: stages at lambda_s + r_1 h and lambda_s + r_2 h."""
    if not r_1 < r_2:
        raise ValueError(f"seeds_3: r_1={r_1} must be below r_2={r_2}")
    x_s, D_s, D2_s = b.slot("x_s"), b.slot("D"), b.slot("D_2")

    def stages_2_3(st, D_2, n_1):
        h_eta, a_t, sg_t = st.h_eta, g.alpha[st.i + 1], g.sigma[st.i + 1]
        t_2, a_2, sg_2 = st.point(r_2)
        # stage 2: to lambda_s + r_2 h with the phi_2 correction from D_2
        a3_2 = (r_2 / r_1) * _ei_phi_2(-r_2 * h_eta)
        a3_1 = _ei_phi_1(-r_2 * h_eta) - a3_2
        c2x = st.x_coef(r_2, sg_2)
        x_3 = c2x * x_s - a_2 * (a3_1 * D_s + a3_2 * D_2)
        noise = 0.0
        if n_1 is not None:
            x_3, noise = st.continue_noise(x_3, n_1, r_1, r_2, sg_2, s_noise)
        b.update(x=x_3, slots={D2_s: D_2}, noise=noise)
        # stage 3: to the next boundary with D_3
        X, D_3 = b.call(t_2, a_2, sg_2)
        b3 = _ei_phi_2(-h_eta) / r_2
        b1 = _ei_phi_1(-h_eta) - b3
        x_next = st.x_coef(1.0, sg_t) * x_s - a_t * (b1 * D_s + b3 * D_3)
        noise = 0.0
        if n_1 is not None:
            n_2 = (X - c2x * x_s + a_2 * (a3_1 * D_s + a3_2 * D2_s)) / (sg_2 * s_noise)
            x_next, noise = st.continue_noise(x_next, n_2, r_2, 1.0, sg_t, s_noise)
        b.update(x=x_next, noise=noise)

    _seeds_steps(b, g, eta, s_noise, r_1, x_s, D_s, stages_2_3)


def er_sde_noise_scaler(x):
    """ER-SDE's default noise scale function f(x) = x (e^{x^0.3} + 10) (ComfyUI's and the authors' default)."""
    return x * (math.exp(x**0.3) + 10.0)


def er_sde_integrals(lam_s, lam_t, points):
    """(int 1/f, int (l - lam_s)/f) over [lam_t, lam_s] by the left Riemann sum on ``points`` points (ComfyUI)."""
    step = (lam_s - lam_t) / points
    i1 = i2 = 0.0
    for k in range(points):
        pos = lam_t + k * step
        f = er_sde_noise_scaler(pos)
        i1 += 1.0 / f
        i2 += (pos - lam_s) / f
    return i1 * step, i2 * step


@solver("er_sde", s_noise=S_NOISE,
        max_stage=Option(3, _int_in(1, 3), "max_stage must be 1, 2 or 3"),
        integration_points=Option(200, _count, "integration_points must be an integer >= 1"))
def er_sde(b, g, s_noise, max_stage, integration_points):
    """ER-SDE-Solver-1/2/3 (VP, data prediction) in lambda = sigma / alpha, ComfyUI's sample_er_sde.

    x_t = (alpha_t / alpha_s) r x_s + alpha_t (1 - r) D + [stage 2, 3 Taylor terms from earlier D's]
          + alpha_t sqrt(lambda_t^2 - lambda_s^2 r^2) z,  r = f(lambda_t) / f(lambda_s);
    the integrals of 1/f are left Riemann sums on ``integration_points`` points, as ComfyUI computes them.
    Stage k uses the last k - 1 data estimates (warm-up min(max_stage, i + 1)).
    """
    Ds = b.history("D", max_stage - 1)  # Ds[j]: D of step i - j
    lam = g.s  # ER-SDE's lambda is sigma / alpha
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        stage = min(max_stage, i + 1)
        Ds.push(D)
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        a_s, a_t = g.alpha[i], g.alpha[i + 1]
        lam_s, lam_t = lam[i], lam[i + 1]
        r = er_sde_noise_scaler(lam_t) / er_sde_noise_scaler(lam_s)
        x_next = ((a_t / a_s) * r) * X + (a_t * (1.0 - r)) * D
        if stage >= 2:
            dt = lam_t - lam_s
            i1, i2 = er_sde_integrals(lam_s, lam_t, integration_points)
            f_t = er_sde_noise_scaler(lam_t)
            D_d = (D - Ds[1]) / (lam_s - lam[i - 1])
            x_next = x_next + (a_t * (dt + i1 * f_t)) * D_d
            if stage >= 3:
                D_d_prev = (Ds[1] - Ds[2]) / (lam[i - 1] - lam[i - 2])
                D_u = (D_d - D_d_prev) / ((lam_s - lam[i - 2]) / 2.0)
                x_next = x_next + (a_t * (dt * dt / 2.0 + i2 * f_t)) * D_u
        var = lam_t**2 - (lam_s * r) ** 2
        noise = a_t * s_noise * math.sqrt(var) if s_noise > 0 and var > 0 else 0.0
        b.update(x=x_next, noise=noise)
