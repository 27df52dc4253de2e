"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b): exponential integrators in lambda.

lambda_t = log(alpha_t / sigma_t) (half the log-SNR), h = lambda_t - lambda_s, and t_lambda(.) its inverse
(``schedule.t_from_lambda``).  DPM-Solver uses the noise prediction eps_theta, DPM-Solver++ the data prediction
x_theta; the k-diffusion variants work in k-diffusion's sigma = sigma / alpha with -log sigma = lambda and are mapped
to the unscaled x = alpha y (alpha_t' (sigma_k'/sigma_k) y = (sigma_t'/sigma_t) x).
"""

from __future__ import annotations

import math

from .ode import ancestral_step, point_at_s


def _check_alpha(a, name):
    if a == 0:
        raise ValueError(f"reference {name}: alpha = 0 at a step start (lambda = -inf); x_t / alpha_s is undefined")


# ---- singlestep DPM-Solver, noise prediction ------------------------------------------------------------------


def _dpm_solver(run, x, order, name):
    g, sch = run.grid, run.schedule
    for i in range(g.steps):
        t_s, a_s, sg_s, lam_s = g.t[i], g.alpha[i], g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        _check_alpha(a_s, name)
        out = run.eval(x, t_s)
        eps_s = out.eps
        if g.clean[i + 1]:
            # DPM-Solver-1 to sigma_t = 0, h = inf: x_t = alpha_t / alpha_s (x_s - sigma_s eps) = x_theta (its limit)
            x = out.x0
            continue
        h = lam_t - lam_s
        if order == 1:
            # eq. (3.7): x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_theta(x_s, s)
            x = (a_t / a_s) * x - sg_t * math.expm1(h) * eps_s
            continue
        r1 = 0.5 if order == 2 else 1.0 / 3.0
        # s_1 = t_lambda(lambda_s + r1 h)
        t_1 = float(sch.t_from_lambda(lam_s + r1 * h))
        a_1, sg_1 = float(sch.alpha(t_1)), float(sch.sigma(t_1))
        # u_1 = (alpha_{s1} / alpha_s) x - sigma_{s1} (e^{r1 h} - 1) eps_theta(x, s)
        u_1 = (a_1 / a_s) * x - sg_1 * math.expm1(r1 * h) * eps_s
        if order == 2:
            # Algorithm 1 (DPM-Solver-2): x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps_s
            #                                   - sigma_t / (2 r1) (e^h - 1) (eps_theta(u_1, s_1) - eps_s)
            eps_1 = run.eval(u_1, t_1).eps
            x = (a_t / a_s) * x - sg_t * math.expm1(h) * eps_s - (sg_t / (2 * r1)) * math.expm1(h) * (eps_1 - eps_s)
            continue
        # Algorithm 2 (DPM-Solver-3), r1 = 1/3, r2 = 2/3
        r2 = 2.0 / 3.0
        # D_1 = eps_theta(u_1, s_1) - eps_s
        D_1 = run.eval(u_1, t_1).eps - eps_s
        # s_2 = t_lambda(lambda_s + r2 h)
        t_2 = float(sch.t_from_lambda(lam_s + r2 * h))
        a_2, sg_2 = float(sch.alpha(t_2)), float(sch.sigma(t_2))
        # u_2 = (alpha_{s2}/alpha_s) x - sigma_{s2} (e^{r2 h} - 1) eps_s
        #       - (sigma_{s2} r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) D_1
        u_2 = ((a_2 / a_s) * x - sg_2 * math.expm1(r2 * h) * eps_s
               - (sg_2 * r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0) * D_1)
        # D_2 = eps_theta(u_2, s_2) - eps_s
        D_2 = run.eval(u_2, t_2).eps - eps_s
        # x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps_s - (sigma_t / r2) ((e^h - 1) / h - 1) D_2
        x = (a_t / a_s) * x - sg_t * math.expm1(h) * eps_s - (sg_t / r2) * (math.expm1(h) / h - 1.0) * D_2
    return x


def dpm_solver_1(run, x):
    """Lu et al. 2022a, DPM-Solver-1, eq. (3.7) (= DDIM)."""
    return _dpm_solver(run, x, 1, "dpm_solver_1")


def dpm_solver_2(run, x):
    """Lu et al. 2022a, Algorithm 1 (DPM-Solver-2, singlestep, r1 = 1/2)."""
    return _dpm_solver(run, x, 2, "dpm_solver_2")


def dpm_solver_3(run, x):
    """Lu et al. 2022a, Algorithm 2 (DPM-Solver-3, singlestep, r1 = 1/3, r2 = 2/3)."""
    return _dpm_solver(run, x, 3, "dpm_solver_3")


# ---- multistep DPM-Solver++, data prediction --------------------------------------------------------------------


def step_orders(grid, order, lower_order_final, euler_at_final=False):
    """o_i = min(order, i + 1); with lower_order_final and < 15 steps also min(o_i, steps - i); 1 to the clean point
    and, with euler_at_final (diffusers), on the last step."""
    n = grid.steps
    orders = []
    for i in range(n):
        o = min(order, i + 1)
        if lower_order_final and n < 15:
            o = min(o, n - i)
        last = euler_at_final and i == n - 1
        orders.append(1 if grid.clean[i + 1] or last else o)
    return orders


def _dpmpp_multistep(run, x, order, lower_order_final, solver_type, euler_at_final):
    """DPM-Solver++ multistep as diffusers' ``multistep_dpm_solver_{first,second,third}_order_update``."""
    g = run.grid
    orders = step_orders(g, order, lower_order_final, euler_at_final)
    Ds = []  # x_theta at t_0, t_1, ...: m0 = Ds[-1] after this step's call, m1 = Ds[-2], m2 = Ds[-3]
    for i in range(g.steps):
        sg_s, lam_s = g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        Ds.append(run.eval(x, g.t[i]).x0)
        D0 = Ds[-1]
        h = lam_t - lam_s
        em = math.expm1(-h)  # e^{-h} - 1
        o = orders[i]
        # first order (DPM-Solver++(1) = DDIM): x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D0
        x_new = (sg_t / sg_s) * x - (a_t * em) * D0
        if o == 2:
            # r0 = h_0 / h, D1 = (m0 - m1) / r0
            r0 = (lam_s - g.lam[i - 1]) / h
            D1 = (1.0 / r0) * (D0 - Ds[-2])
            if solver_type == "midpoint":
                x_new = x_new - (0.5 * a_t * em) * D1
            else:  # heun ("taylor" in the DPM-Solver code)
                x_new = x_new + (a_t * (em / h + 1.0)) * D1
        elif o == 3:
            # r0 = h_0 / h, r1 = h_1 / h; D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1
            r0 = (lam_s - g.lam[i - 1]) / h
            r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
            D1_0 = (1.0 / r0) * (D0 - Ds[-2])
            D1_1 = (1.0 / r1) * (Ds[-2] - Ds[-3])
            # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
            # + alpha_t ((e^{-h} - 1) / h + 1) D1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2
            x_new = x_new + (a_t * (em / h + 1.0)) * D1 - (a_t * ((em + h) / h**2 - 0.5)) * D2
        x = x_new
    return x


def dpmpp_2m(run, x, lower_order_final=True, solver_type="midpoint", euler_at_final=False):
    """Lu et al. 2022b, Algorithm 2 (DPM-Solver++(2M)); solver_type "heun" is the Taylor form of diffusers."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _dpmpp_multistep(run, x, 2, lower_order_final, solver_type, euler_at_final)


def dpmpp_3m(run, x, lower_order_final=True, solver_type="midpoint", euler_at_final=False):
    """Lu et al. 2022b, DPM-Solver++(3M): diffusers' third-order multistep update; ``solver_type`` is the form of the
    second-order warm-up / cool-down steps (diffusers' default "midpoint" = the DPM-Solver code's "dpmsolver")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_3m: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _dpmpp_multistep(run, x, 3, lower_order_final, solver_type, euler_at_final)


# ---- k-diffusion's SDE / ancestral variants -----------------------------------------------------------------------


def dpmpp_2m_sde(run, x, eta=1.0, s_noise=1.0, lower_order_final=True, solver_type="midpoint", euler_at_final=False):
    """k-diffusion ``sample_dpmpp_2m_sde`` (DPM-Solver++(2M) SDE, Lu et al. 2022b), with dpmpp_2m's step orders."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    g = run.grid
    orders = step_orders(g, 2, lower_order_final, euler_at_final)
    old_denoised = None
    for i in range(g.steps):
        sg_s, lam_s = g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        denoised = run.eval(x, g.t[i]).x0
        if g.clean[i + 1]:
            x = denoised  # denoising step
        else:
            # h = s - t in -log sigma; eta_h = eta h
            h = lam_t - lam_s
            eta_h = eta * h if eta else 0.0
            # x = sigma_{i+1}/sigma_i e^{-eta h} x + (1 - e^{-h - eta h}) denoised   (k-diffusion's y, times alpha_t)
            phi = -math.expm1(-h - eta_h)
            x_new = (sg_t / sg_s) * math.exp(-eta_h) * x + (a_t * phi) * denoised
            if orders[i] == 2:
                # r = h_last / h
                r = (lam_s - g.lam[i - 1]) / h
                if solver_type == "heun":
                    x_new = x_new + (a_t * (phi / (-h - eta_h) + 1.0) * (1.0 / r)) * (denoised - old_denoised)
                else:
                    x_new = x_new + (a_t * 0.5 * phi * (1.0 / r)) * (denoised - old_denoised)
            # noise: sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z
            gain = sg_t * math.sqrt(-math.expm1(-2.0 * eta_h)) * s_noise
            x = x_new + gain * run.noise(x) if gain > 0 else x_new
        old_denoised = denoised
    return x


def dpmpp_3m_sde(run, x, eta=1.0, s_noise=1.0, lower_order_final=True, solver_type="heun", euler_at_final=False):
    """k-diffusion ``sample_dpmpp_3m_sde`` (DPM-Solver++(3M) SDE), with dpmpp_3m's step orders; ``solver_type``
    "midpoint" gives its second-order warm-up steps diffusers' midpoint form (k-diffusion's is "heun")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_3m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    g = run.grid
    orders = step_orders(g, 3, lower_order_final, euler_at_final)
    denoised_1 = denoised_2 = None
    for i in range(g.steps):
        sg_s, lam_s = g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        denoised = run.eval(x, g.t[i]).x0
        if g.clean[i + 1]:
            x = denoised  # denoising step
        else:
            # h = s - t, h_eta = h (eta + 1)
            h = lam_t - lam_s
            eta_h = eta * h if eta else 0.0
            h_eta = h + eta_h
            # x = e^{-h_eta} x + (1 - e^{-h_eta}) denoised  (k-diffusion's y; e^{-h} alpha_t/alpha_s = sigma_t/sigma_s)
            x_new = (sg_t / sg_s) * math.exp(-eta_h) * x + (a_t * -math.expm1(-h_eta)) * denoised
            o = orders[i]
            if o >= 2:
                phi_2 = math.expm1(-h_eta) / h_eta + 1.0
            if o == 3:
                # r0 = h_1 / h, r1 = h_2 / h
                r0 = (lam_s - g.lam[i - 1]) / h
                r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
                d1_0 = (1.0 / r0) * (denoised - denoised_1)
                d1_1 = (1.0 / r1) * (denoised_1 - denoised_2)
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
                phi_3 = phi_2 / h_eta - 0.5
                x_new = x_new + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
            elif o == 2:
                r = (lam_s - g.lam[i - 1]) / h
                d = (1.0 / r) * (denoised - denoised_1)
                if solver_type == "heun":
                    x_new = x_new + (a_t * phi_2) * d
                else:  # midpoint: + 1/2 (1 - e^{-h_eta}) alpha_t D1
                    x_new = x_new + (a_t * 0.5 * -math.expm1(-h_eta)) * d
            # noise: sigma_{i+1} sqrt(1 - e^{-2 h eta}) s_noise z
            gain = sg_t * math.sqrt(-math.expm1(-2.0 * eta_h)) * s_noise
            x = x_new + gain * run.noise(x) if gain > 0 else x_new
        denoised_1, denoised_2 = denoised, denoised_1
    return x


def dpmpp_2s_ancestral(run, x, eta=1.0, s_noise=1.0):
    """k-diffusion ``sample_dpmpp_2s_ancestral``: DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) to sigma_down,
    then fresh noise up to sigma_{i+1}."""
    g, sch = run.grid, run.schedule
    for i in range(g.steps):
        s_i, a_next = g.s[i], g.alpha[i + 1]
        denoised = run.eval(x, g.t[i]).x0
        sigma_down, sigma_up = ancestral_step(s_i, g.s[i + 1], eta)
        if sigma_down == 0:
            # Euler step to sigma_down = 0: y + d (0 - sigma) = denoised (also in the alpha = 0 limit)
            if g.alpha[i] > 0:
                y = x / g.alpha[i]
                y_next = y + ((y - denoised) / s_i) * (sigma_down - s_i)
            else:
                y_next = denoised
        else:
            _check_alpha(g.alpha[i], "dpmpp_2s_ancestral")
            y = x / g.alpha[i]
            # t = -log sigma, t_next = -log sigma_down, h = t_next - t, s = t + r h with r = 1/2
            t, t_next = -math.log(s_i), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            # x_2 = (sigma(s) / sigma(t)) x - (e^{-h r} - 1) denoised
            y_2 = (math.exp(-s) / math.exp(-t)) * y - math.expm1(-0.5 * h) * denoised
            t_mid, a_mid, sg_mid = point_at_s(sch, math.exp(-s))
            denoised_2 = run.eval(a_mid * y_2, t_mid, a_mid, sg_mid).x0
            # x = (sigma(t_next) / sigma(t)) x - (e^{-h} - 1) denoised_2
            y_next = (math.exp(-t_next) / math.exp(-t)) * y - math.expm1(-h) * denoised_2
        # noise addition: x = x + z s_noise sigma_up
        if sigma_up * s_noise > 0:
            y_next = y_next + (s_noise * sigma_up) * run.noise(x)
        x = a_next * y_next
    return x


# ---- singlestep DPM-Solver(++) through grid points (diffusers' DPMSolverSinglestepScheduler) -----------------------


def _singlestep_orders(n, order, lower_order_final, clean_end):
    """Repeated groups 1, 2(, 3); with lower_order_final the final group is cut to end on the last step."""
    if order == 1:
        orders = [1] * n
    else:
        group = list(range(1, order + 1))
        full, rest = divmod(n, order)
        if not lower_order_final:
            orders = group * full
        elif rest == 0:
            # the last full group becomes 1, 2 (order 3) or 1 (order 2) followed by a first-order step
            orders = group * (full - 1) + group[:-1] + [1]
        else:
            orders = group * full + group[:rest]
        if len(orders) != n:
            raise ValueError("dpm_solver_singlestep: steps must be divisible by order without lower_order_final")
    if clean_end:
        orders[-1] = 1
    return orders


def dpm_solver_singlestep(run, x, order=2, algorithm="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                          orders=()):
    """Singlestep DPM-Solver (Lu et al. 2022a) / DPM-Solver++ (2022b) whose intermediate points are the grid points:
    a group starts at x_s and its j-th step lands on the next grid point from x_s with the (j+1)-th order formula
    (the multi-point forms of diffusers' ``singlestep_dpm_solver_{first,second,third}_order_update``)."""
    g = run.grid
    orders = [int(o) for o in orders] or _singlestep_orders(g.steps, order, lower_order_final, g.clean[-1])
    x_s, ms = x, []
    for k in range(g.steps):
        o = orders[k]
        out = run.eval(x, g.t[k])
        m = out.eps if algorithm == "dpmsolver" else out.x0
        if o == 1:
            x_s, ms = x, []
        ms.append(m)
        s = k - o + 1
        a_s, sg_s, lam_s = g.alpha[s], g.sigma[s], g.lam[s]
        a_t, sg_t, lam_t = g.alpha[k + 1], g.sigma[k + 1], g.lam[k + 1]
        h = lam_t - lam_s
        if o >= 2 and not math.isfinite(lam_s):
            raise ValueError("dpm_solver_singlestep: a higher-order group cannot start at alpha = 0 (lambda = -inf)")
        if o >= 2:
            r0 = (g.lam[k] - lam_s) / h  # the newest point
        if o == 3:
            r1 = (g.lam[k - 1] - lam_s) / h
            D1_0 = (1.0 / r1) * (ms[1] - ms[0])
            D1_1 = (1.0 / r0) * (ms[2] - ms[0])
            D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
            D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
        if algorithm == "dpmsolver++":
            em = math.expm1(-h)  # e^{-h} - 1
            x = (sg_t / sg_s) * x_s - (a_t * em) * ms[0]
            if o == 2:
                D1 = (1.0 / r0) * (ms[1] - ms[0])
                x = x - (0.5 * a_t * em) * D1 if solver_type == "midpoint" else x + (a_t * (em / h + 1.0)) * D1
            elif o == 3 and solver_type == "midpoint":
                x = x + (a_t * (em / h + 1.0)) * D1_1
            elif o == 3:
                x = x + (a_t * (em / h + 1.0)) * D1 - (a_t * ((em + h) / h**2 - 0.5)) * D2
        elif algorithm == "dpmsolver":
            ep = math.expm1(h)  # e^h - 1
            x = (a_t / a_s) * x_s - (sg_t * ep) * ms[0]
            if o == 2:
                D1 = (1.0 / r0) * (ms[1] - ms[0])
                x = x - (0.5 * sg_t * ep) * D1 if solver_type == "midpoint" else x - (sg_t * (ep / h - 1.0)) * D1
            elif o == 3 and solver_type == "midpoint":
                x = x - (sg_t * (ep / h - 1.0)) * D1_1
            elif o == 3:
                x = x - (sg_t * (ep / h - 1.0)) * D1 - (sg_t * ((ep - h) / h**2 - 0.5)) * D2
        else:  # sde-dpmsolver++: the same expansions of the SDE's exponential integrator in 2h
            e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            x = (sg_t / sg_s * math.exp(-h)) * x_s + (a_t * e2) * ms[0]
            phi = e2 / (-2.0 * h) + 1.0
            if o == 2:
                D1 = (1.0 / r0) * (ms[1] - ms[0])
                x = x + (0.5 * a_t * e2) * D1 if solver_type == "midpoint" else x + (a_t * phi) * D1
            elif o == 3 and solver_type == "midpoint":
                x = x + (a_t * phi) * D1_1
            elif o == 3:
                # phi_3 = (e^{-2h} - 1 + 2h) / (2h)^2 - 1/2, the Taylor coefficient of D2, with its minus sign
                x = x + (a_t * phi) * D1 - (a_t * ((2.0 * h - e2) / (4.0 * h * h) - 0.5)) * D2
            if not g.clean[k + 1]:
                x = x + sg_t * math.sqrt(-math.expm1(-2.0 * h)) * run.noise(x)
    return x


def dpm_solver_multistep(run, x, order=2, algorithm="dpmsolver", solver_type="midpoint", lower_order_final=True,
                         euler_at_final=False):
    """Multistep DPM-Solver with noise prediction (Lu et al. 2022a, eq. 3.3 / 3.4 in multistep form, as diffusers'
    ``algorithm_type="dpmsolver"``), and its SDE variant (``"sde-dpmsolver"``, orders 1-2): the eps terms doubled
    plus sigma_t sqrt(e^{2h} - 1) z."""
    if algorithm == "sde-dpmsolver" and order == 3:
        raise ValueError("dpm_solver_multistep: sde-dpmsolver is defined up to order 2")
    g = run.grid
    if algorithm == "sde-dpmsolver" and g.clean[-1]:
        raise ValueError("dpm_solver_multistep: sde-dpmsolver cannot end on the clean point")
    orders = step_orders(g, order, lower_order_final, euler_at_final)
    eps = []
    for i in range(g.steps):
        a_s, sg_s, lam_s = g.alpha[i], g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        if a_s == 0:
            raise ValueError("dpm_solver_multistep divides by alpha_s = 0")
        eps.append(run.eval(x, g.t[i]).eps)
        h = lam_t - lam_s
        ep = math.expm1(h)
        k = 2.0 if algorithm == "sde-dpmsolver" else 1.0
        # sigma_t (e^h - 1) = alpha_t sigma_s / alpha_s - sigma_t (its limit on a step to the clean point)
        phi = sg_t * ep if math.isfinite(ep) else a_t * sg_s / a_s - sg_t
        x_new = (a_t / a_s) * x - (k * phi) * eps[-1]
        o = orders[i]
        if o == 2:
            D1 = (eps[-1] - eps[-2]) / ((lam_s - g.lam[i - 1]) / h)
            if solver_type == "midpoint":
                x_new = x_new - (0.5 * k * sg_t * ep) * D1
            else:
                x_new = x_new - (k * sg_t * (ep / h - 1.0)) * D1
        elif o == 3:
            r0, r1 = (lam_s - g.lam[i - 1]) / h, (g.lam[i - 1] - g.lam[i - 2]) / h
            D1_0, D1_1 = (eps[-1] - eps[-2]) / r0, (eps[-2] - eps[-3]) / r1
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            x_new = x_new - (sg_t * (ep / h - 1.0)) * D1 - (sg_t * ((ep - h) / h**2 - 0.5)) * D2
        if algorithm == "sde-dpmsolver" and not g.clean[i + 1]:
            x_new = x_new + sg_t * math.sqrt(math.expm1(2.0 * h)) * run.noise(x)
        x = x_new
    return x
