"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), exponential integrators in lambda.

h = lambda_t - lambda_s with lambda = log(alpha / sigma).  Singlestep DPM-Solver-1/2/3 are Algorithms 1-2 of
the first paper (noise prediction, r1 = 1/2 for order 2, r1 = 1/3, r2 = 2/3 for order 3); the multistep
DPM-Solver++ 2M / 3M / 2M-SDE follow Algorithm 2 of the second paper in the form diffusers and k-diffusion use
(midpoint or heun second-order term).  A step that ends on the clean point (h = inf) is first order and returns D.
Multistep solvers warm up at lower order; with ``lower_order_final`` and fewer than 15 steps they also cool down
(diffusers' rule), which keeps few-step sampling stable.
"""

import math

from .builder import eps_hat, exp_neg_h
from .registry import ETA1, LOWER_ORDER_FINAL, S_NOISE, Option, _flag, _int_in, _one_of, solver
from .ode import ancestral_split, euler_to


def sigma_expm1(alpha_u, sigma_u, lam_u, alpha_s, sigma_s, lam_s):
    """sigma_u (e^{lam_u - lam_s} - 1), via expm1 when finite, else as alpha_u sigma_s / alpha_s - sigma_u."""
    if math.isfinite(lam_u) and math.isfinite(lam_s):
        return sigma_u * math.expm1(lam_u - lam_s)
    return alpha_u * sigma_s / alpha_s - sigma_u


def neg_expm1(h, e_h):
    """1 - e^{-h}, accurate for small h; e_h = e^{-h} given as a ratio handles h = inf."""
    return -math.expm1(-h) if math.isfinite(h) else 1.0 - e_h


# ---- singlestep DPM-Solver, noise prediction ---------------------------------------------------------------


def _dpm_solver_step(b, g, i, order, x_s, eps_s_slot):
    a_s, sg_s, lam_s = g.alpha[i], g.sigma[i], g.lam[i]
    a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
    X, D = b.call(g.t[i])
    eps_s = eps_hat(X, D, a_s, sg_s)
    if order == 1 or g.zero[i + 1]:
        # DPM-Solver-1 (= DDIM): x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps_s
        b.update(x=(a_t / a_s) * X - sigma_expm1(a_t, sg_t, lam_t, a_s, sg_s, lam_s) * eps_s)
        return
    h = lam_t - lam_s
    phi_t = sigma_expm1(a_t, sg_t, lam_t, a_s, sg_s, lam_s)  # sigma_t (e^h - 1)
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    pts = []
    for r in rs:
        lam_u = lam_s + r * h
        t_u = g.t_of_lambda(lam_u)
        a_u, sg_u = g.at(t_u)
        pts.append((t_u, a_u, sg_u, sigma_expm1(a_u, sg_u, lam_u, a_s, sg_s, lam_s)))
    r1 = rs[0]
    t1, a1, sg1, phi1 = pts[0]
    # u1 = (alpha_s1 / alpha_s) x - sigma_s1 (e^{r1 h} - 1) eps_s
    b.update(x=(a1 / a_s) * X - phi1 * eps_s, slots={x_s: X, eps_s_slot: eps_s})
    X, D = b.call(t1)
    d1 = eps_hat(X, D, a1, sg1) - eps_s_slot
    if order == 2:
        # Algorithm 1: x_t = ... - sigma_t / (2 r1) (e^h - 1) (eps(u1) - eps_s)
        b.update(x=(a_t / a_s) * x_s - phi_t * eps_s_slot - (phi_t / (2 * r1)) * d1)
        return
    r2 = rs[1]
    t2, a2, sg2, phi2 = pts[1]
    # Algorithm 2: u2 = (alpha_s2/alpha_s) x - sigma_s2 (e^{r2 h} - 1) eps_s - sigma_s2 r2/r1 (phi_1(r2 h) - 1) D1
    c2 = (sg2 * r2 / r1) * (phi2 / (sg2 * r2 * h) - 1.0)
    b.update(x=(a2 / a_s) * x_s - phi2 * eps_s_slot - c2 * d1)
    X, D = b.call(t2)
    d2 = eps_hat(X, D, a2, sg2) - eps_s_slot
    # x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps_s - sigma_t / r2 ((e^h - 1)/h - 1) D2
    b.update(x=(a_t / a_s) * x_s - phi_t * eps_s_slot - ((phi_t / h - sg_t) / r2) * d2)


def _singlestep(order):
    def fn(b, g):
        x_s, eps_s = (b.slot("x_s"), b.slot("eps_s")) if order > 1 else (None, None)
        for i in b.steps(g.steps):
            _dpm_solver_step(b, g, i, order, x_s, eps_s)

    fn.__name__ = f"dpm_solver_{order}"
    return fn


for _order in (1, 2, 3):
    solver(f"dpm_solver_{_order}")(_singlestep(_order))


# ---- multistep DPM-Solver++ (data prediction) -----------------------------------------------------------------


def step_orders(g, order, lower_order_final, euler_at_final=False):
    """Order of each step: warm-up min(order, i + 1); cool-down for < 15 steps; 1 on a step to the clean point
    (and on the last step with ``euler_at_final``, diffusers' option for stability with few steps)."""
    orders = []
    for i in range(g.steps):
        o = min(order, i + 1)
        if lower_order_final and g.steps < 15:
            o = min(o, g.steps - i)
        if g.zero[i + 1] or (euler_at_final and i == g.steps - 1):
            o = 1
        orders.append(o)
    return orders


SOLVER_TYPE = Option("midpoint", _one_of("midpoint", "heun"), "solver_type must be 'midpoint' or 'heun'")


def _multistep(b, g, order, lower_order_final, solver_type, eta=0.0, s_noise=1.0, euler_at_final=False):
    """DPM-Solver++(2M/3M), and the SDE variant when eta > 0, over the last order - 1 data estimates."""
    Ds = b.history("D", order - 1)  # Ds[j]: D of step i - j (U in a CFG++ build)
    orders = step_orders(g, order, lower_order_final, euler_at_final)
    for i in b.steps(g.steps):
        a_s, sg_s, lam_s = g.alpha[i], g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        h = lam_t - lam_s
        e_h = exp_neg_h(a_t, sg_t, a_s, sg_s)
        X, D, U = b.call(g.t[i], uncond=True)
        o = orders[i]
        # Exponential integrator with data prediction; eta > 0 gives the SDE variant (k-diffusion's h_eta).
        e_eta = e_h**eta if eta else 1.0
        h_eta = h * (1.0 + eta)
        one_minus = neg_expm1(h_eta, e_h ** (1.0 + eta))  # 1 - e^{-h (1 + eta)}
        if b.cfgpp:  # CFG++ (ComfyUI's sample_dpmpp_2m_cfg_pp): x' = alpha_t (D + e^{-h} (y - U)) + ...
            x_next = (sg_t / sg_s) * X + a_t * (D - e_h * U)
        else:
            x_next = (sg_t / sg_s) * e_eta * X + a_t * one_minus * D
        if o >= 2:
            D_prev = Ds[1]
            r0 = (lam_s - g.lam[i - 1]) / h
            D1_0 = (D - D_prev) / r0
            if o == 2:
                D1 = D1_0
            else:
                D_prev2 = Ds[2]
                r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
                D1_1 = (D_prev - D_prev2) / r1
                D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
            if o == 2 and solver_type == "midpoint":
                x_next = x_next + (0.5 * a_t * one_minus) * D1
            else:  # heun form, and the 3rd-order expansion (diffusers' multistep_dpm_solver_third_order_update)
                x_next = x_next + (a_t * (one_minus / (-h_eta) + 1.0)) * D1
            if o == 3:
                phi_3 = (one_minus / (-h_eta) + 1.0) / h_eta - 0.5  # = (e^{-h} - 1 + h) / h^2 - 1/2 for eta = 0
                x_next = x_next - (a_t * phi_3) * D2
        noise = sg_t * math.sqrt(max(-math.expm1(-2.0 * eta * h), 0.0)) * s_noise if eta and sg_t > 0 else 0.0
        Ds.push(U)
        b.update(x=x_next, noise=noise)


EULER_AT_FINAL = Option(False, _flag, "euler_at_final must be True or False")


@solver("dpmpp_2m", alpha_zero=True, cfgpp=True, lower_order_final=LOWER_ORDER_FINAL, solver_type=SOLVER_TYPE,
        euler_at_final=EULER_AT_FINAL)
def dpmpp_2m(b, g, lower_order_final, solver_type, euler_at_final):
    """DPM-Solver++(2M).  Its CFG++ variant (ComfyUI's sample_dpmpp_2m_cfg_pp with lower_order_final=False) renoises
    with U and forms the second-order difference from the previous step's U: D_1 = (D - U_prev) / r."""
    _multistep(b, g, 2, lower_order_final, solver_type, euler_at_final=euler_at_final)


@solver("dpmpp_3m", alpha_zero=True, lower_order_final=LOWER_ORDER_FINAL, solver_type=SOLVER_TYPE, euler_at_final=EULER_AT_FINAL)
def dpmpp_3m(b, g, lower_order_final, solver_type, euler_at_final):
    """DPM-Solver++(3M); ``solver_type`` picks the form of its second-order warm-up / cool-down steps (diffusers)."""
    _multistep(b, g, 3, lower_order_final, solver_type, euler_at_final=euler_at_final)


@solver("dpmpp_2m_sde", alpha_zero=True, eta=ETA1, s_noise=S_NOISE, lower_order_final=LOWER_ORDER_FINAL, solver_type=SOLVER_TYPE,
        euler_at_final=EULER_AT_FINAL)
def dpmpp_2m_sde(b, g, eta, s_noise, lower_order_final, solver_type, euler_at_final):
    _multistep(b, g, 2, lower_order_final, solver_type, eta=eta, s_noise=s_noise, euler_at_final=euler_at_final)


@solver("dpmpp_3m_sde", alpha_zero=True, eta=ETA1, s_noise=S_NOISE, lower_order_final=LOWER_ORDER_FINAL,
        solver_type=Option("heun", SOLVER_TYPE.check, SOLVER_TYPE.hint), euler_at_final=EULER_AT_FINAL)
def dpmpp_3m_sde(b, g, eta, s_noise, lower_order_final, solver_type, euler_at_final):
    """k-diffusion's DPM-Solver++(3M) SDE (``solver_type`` shapes its second-order warm-up, as in diffusers)."""
    _multistep(b, g, 3, lower_order_final, solver_type, eta=eta, s_noise=s_noise, euler_at_final=euler_at_final)


@solver("dpmpp_2s_ancestral", alpha_zero=True, cfgpp=True, eta=ETA1, s_noise=S_NOISE)
def dpmpp_2s_ancestral(b, g, eta, s_noise):
    """k-diffusion's DPM-Solver++(2S) ancestral: a midpoint step to sigma_down, then noise up.  The CFG++ variant
    (ComfyUI's sample_dpmpp_2s_ancestral_cfg_pp) renoises both stages from y + D - U."""
    y_i = b.slot("y_i")
    for i in b.steps(g.steps):
        s, a_t = g.s[i], g.alpha[i + 1]
        down, up = ancestral_split(s, g.s[i + 1], eta)
        X, D, U = b.call(g.t[i], uncond=True)
        if down == 0:  # Euler to sigma_down = 0, then the ancestral noise (zero only on a step to the clean point)
            b.update(x=euler_to(D, eps_hat(X, U, g.alpha[i], g.sigma[i]), a_t, 0.0), noise=a_t * up * s_noise)
            continue
        if not math.isfinite(s):
            raise ValueError("dpmpp_2s_ancestral cannot start at alpha = 0 with sigma_down > 0 (its midpoint is at "
                             "sigma/alpha = inf): use eta >= 1 there, euler_ancestral, or lower t_max")
        h = math.log(s / down)
        s_mid = s * math.exp(-0.5 * h)
        t_mid, a_mid, sg_mid = g.point_at_s(s_mid)
        y = X / g.alpha[i] + (D - U) if b.cfgpp else X / g.alpha[i]
        # x_2 = (sigma(s)/sigma(t)) y - expm1(-h/2) D, in x = alpha y
        b.update(x=a_mid * ((s_mid / s) * y - math.expm1(-0.5 * h) * D), slots={y_i: y})
        X, D2 = b.call(t_mid, a_mid, sg_mid)
        b.update(x=a_t * ((down / s) * y_i - math.expm1(-h) * D2), noise=a_t * up * s_noise)


# ---- singlestep DPM-Solver / DPM-Solver++ on a given grid (diffusers' DPMSolverSinglestepScheduler) ------------------


def singlestep_orders(steps, order, lower_order_final, final_zero):
    """diffusers' order list: groups [1, 2(, 3)] repeated; with lower_order_final the tail is shortened so that the
    last group ends on the last step; a step to the clean point is first order."""
    if order == 3:
        if not lower_order_final:
            orders = [1, 2, 3] * (steps // 3)
        elif steps % 3 == 0:
            orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2, 1]
        else:
            orders = [1, 2, 3] * (steps // 3) + [1, 2][: steps % 3]
    elif order == 2:
        if not lower_order_final:
            orders = [1, 2] * (steps // 2)
        elif steps % 2 == 0:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1]
        else:
            orders = [1, 2] * (steps // 2) + [1]
    else:
        orders = [1] * steps
    if len(orders) != steps:
        raise ValueError(f"dpm_solver_singlestep: order={order} without lower_order_final needs steps divisible by "
                         f"{order} (got {steps}); set lower_order_final=True or pass orders=")
    if final_zero:
        orders[-1] = 1
    return orders


def _check_orders(orders, steps):
    if len(orders) != steps:
        raise ValueError(f"dpm_solver_singlestep: orders= has {len(orders)} entries for {steps} steps")
    if any(o not in (1, 2, 3) for o in orders):
        raise ValueError(f"dpm_solver_singlestep: orders={list(orders)} must hold step orders 1, 2 or 3")
    orders = [int(o) for o in orders]
    for k, o in enumerate(orders):
        # order o at step k continues the group that started (order 1) at step k - o + 1
        if o not in (1, 2, 3) or any(k - j < 0 or orders[k - j] != o - j for j in range(1, o)):
            raise ValueError(f"dpm_solver_singlestep: orders={list(orders)} is not a sequence of groups 1, 2(, 3) "
                             f"(step {k})")


ALGORITHM = Option("dpmsolver++", _one_of("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
                   "algorithm must be 'dpmsolver++' (data prediction), 'dpmsolver' (noise) or 'sde-dpmsolver++'")


@solver("dpm_solver_singlestep", order=Option(2, _int_in(1, 3), "order must be 1, 2 or 3"),
        algorithm=ALGORITHM, solver_type=SOLVER_TYPE, lower_order_final=LOWER_ORDER_FINAL,
        orders=Option((), lambda v: isinstance(v, tuple), "orders must be a sequence of step orders"))
def dpm_solver_singlestep(b, g, order, algorithm, solver_type, lower_order_final, orders):
    """Singlestep DPM-Solver(++) whose intermediate points are grid points (diffusers' singlestep scheduler).

    A group of o steps starts from x_s (saved in slot 0) and calls the model on o consecutive grid points; step j of
    the group lands on the next grid point with the order-(j+1) update from x_s using the group's model outputs
    (Lu et al. 2022a, Algorithms 1-2 and Lu et al. 2022b, in their multi-point form).  Slots: 0 = x_s, 1-2 = the
    group's earlier model outputs (data or noise prediction, per ``algorithm``).
    """
    x_s_slot = b.slot("x_s")
    group = [b.slot("m1"), b.slot("m2")]  # the group's earlier model outputs
    if orders:
        _check_orders(orders, g.steps)
        orders = [int(o) for o in orders]
        if g.zero[-1]:
            orders[-1] = 1  # a step to the clean point is first order (as in the default order list)
    else:
        orders = singlestep_orders(g.steps, order, lower_order_final, bool(g.zero[-1]))
    data = algorithm != "dpmsolver"
    sde = algorithm == "sde-dpmsolver++"
    for k in b.steps(g.steps):
        o = orders[k]
        j0 = k - o + 1  # the group's start
        X, D = b.call(g.t[k])
        m0 = D if data else eps_hat(X, D, g.alpha[k], g.sigma[k])
        x_s = X if o == 1 else x_s_slot
        ms = group[: o - 1] + [m0]  # m_{j0} .. m_k
        a_s, sg_s, lam_s = g.alpha[j0], g.sigma[j0], g.lam[j0]
        a_t, sg_t, lam_t = g.alpha[k + 1], g.sigma[k + 1], g.lam[k + 1]
        h = lam_t - lam_s
        noise = 0.0
        if data and not sde:
            e = math.expm1(-h) if math.isfinite(h) else -1.0  # e^{-h} - 1
            x_t = (sg_t / sg_s) * x_s - (a_t * e) * ms[0]
            c1, c2 = -0.5 * a_t * e, a_t * (e / h + 1.0) if o > 1 else 0.0
            c3 = -a_t * ((e + h) / h ** 2 - 0.5) if o > 1 else 0.0
        elif sde:
            e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            x_t = ((sg_t / sg_s) * math.exp(-h)) * x_s + (a_t * e2) * ms[0]
            c1, c2 = 0.5 * a_t * e2, a_t * (e2 / (-2.0 * h) + 1.0) if o > 1 else 0.0
            # the Taylor term of the exponential integrator (+1/2; diffusers' -1/2 is a sign error, see the tests)
            c3 = a_t * ((e2 - 2.0 * h) / (4.0 * h * h) + 0.5) if o > 1 else 0.0
            noise = sg_t * math.sqrt(max(-math.expm1(-2.0 * h), 0.0))
        else:  # noise prediction
            ep = math.expm1(h)  # e^h - 1
            x_t = (a_t / a_s) * x_s - (sg_t * ep) * ms[0]
            c1, c2 = -0.5 * sg_t * ep, -sg_t * (ep / h - 1.0) if o > 1 else 0.0
            c3 = -sg_t * ((ep - h) / h ** 2 - 0.5) if o > 1 else 0.0
        if o == 2:
            r0 = (g.lam[k] - lam_s) / h
            D1 = (ms[1] - ms[0]) / r0
            x_t = x_t + (c1 if solver_type == "midpoint" else c2) * D1
        elif o == 3:
            r0, r1 = (g.lam[k] - lam_s) / h, (g.lam[k - 1] - lam_s) / h
            D1_0, D1_1 = (ms[1] - ms[0]) / r1, (ms[2] - ms[0]) / r0
            if solver_type == "midpoint":
                x_t = x_t + c2 * D1_1
            else:
                D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
                D2 = (2.0 / (r0 - r1)) * (D1_1 - D1_0)
                x_t = x_t + c2 * D1 + c3 * D2
        slots = {group[k - j0]: m0} if k - j0 < 2 else {}  # the group's last output is never read again
        if o == 1:
            slots[x_s_slot] = X
        b.update(x=x_t, slots=slots, noise=noise)


# ---- multistep DPM-Solver with noise prediction (Lu et al. 2022a, the multistep form of diffusers) -------------------


@solver("dpm_solver_multistep",
        order=Option(2, _int_in(1, 3), "order must be 1, 2 or 3"),
        algorithm=Option("dpmsolver", _one_of("dpmsolver", "sde-dpmsolver"),
                         "algorithm must be 'dpmsolver' or 'sde-dpmsolver' (data prediction: dpmpp_2m / dpmpp_3m)"),
        solver_type=SOLVER_TYPE, lower_order_final=LOWER_ORDER_FINAL, euler_at_final=EULER_AT_FINAL)
def dpm_solver_multistep(b, g, order, algorithm, solver_type, lower_order_final, euler_at_final):
    """Multistep DPM-Solver in the noise estimate eps: x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps_0 - ...;
    ``sde-dpmsolver`` doubles the eps terms and adds sigma_t sqrt(e^{2h} - 1) z (orders 1-2). It cannot end on the
    clean point with noise; the ODE's first-order step there returns D (sigma_t (e^h - 1) -> alpha_t sigma_s / alpha_s).
    The last order - 1 noise estimates are kept."""
    if algorithm == "sde-dpmsolver" and order == 3:
        raise ValueError("dpm_solver_multistep: sde-dpmsolver is defined up to order 2")
    if algorithm == "sde-dpmsolver" and g.zero[-1]:
        raise ValueError("dpm_solver_multistep: sde-dpmsolver cannot end on the clean point; use final='t_min'")
    eps = b.history("eps", order - 1)  # eps[j]: eps of step i - j
    orders = step_orders(g, order, lower_order_final, euler_at_final)
    sde = algorithm == "sde-dpmsolver"
    for i in b.steps(g.steps):
        a_s, sg_s, lam_s = g.alpha[i], g.sigma[i], g.lam[i]
        a_t, sg_t, lam_t = g.alpha[i + 1], g.sigma[i + 1], g.lam[i + 1]
        h = lam_t - lam_s
        ep = math.expm1(h)  # e^h - 1
        X, D = b.call(g.t[i])
        e0 = eps_hat(X, D, a_s, sg_s)
        k = 2.0 if sde else 1.0
        x_next = (a_t / a_s) * X - (k * sigma_expm1(a_t, sg_t, lam_t, a_s, sg_s, lam_s)) * e0
        o = orders[i]
        if o >= 2:
            e1 = eps[1]
            r0 = (lam_s - g.lam[i - 1]) / h
            D1_0 = (e0 - e1) / r0
        if o == 2:
            if solver_type == "midpoint":
                x_next = x_next - (0.5 * k * sg_t * ep) * D1_0
            else:
                x_next = x_next - (k * sg_t * (ep / h - 1.0)) * D1_0
        elif o == 3:
            e2 = eps[2]
            r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
            D1_1 = (e1 - e2) / r1
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            x_next = x_next - (sg_t * (ep / h - 1.0)) * D1 - (sg_t * ((ep - h) / h ** 2 - 0.5)) * D2
        noise = sg_t * math.sqrt(max(math.expm1(2.0 * h), 0.0)) if sde else 0.0
        eps.push(e0)
        b.update(x=x_next, noise=noise)
