"""Flow-matching ODE solvers in the schedule's own time t (Lipman et al. 2023; 004_*.txt "Sampling").

The velocity dx/dt = alpha'(t) D + sigma'(t) eps_hat is affine in (x, D) and finite at alpha = 0 (t = 1 on
rectified flow), so these solvers start on pure noise.  A step that ends on the clean point returns D.
"""

from . import eps_hat, solver


def velocity(b, g, t, X, D):
    sch = g.schedule
    a, s = sch.alpha(t), sch.sigma(t)
    return sch.dalpha(t) * D + sch.dsigma(t) * eps_hat(X, D, a, s)


@solver("flow_euler", 0)
def flow_euler(b, g):
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        b.update(x=X + (g.t[i + 1] - g.t[i]) * velocity(b, g, g.t[i], X, D))


@solver("flow_heun", 2)
def flow_heun(b, g):
    """Heun's method: Euler predictor, trapezoidal corrector; slots: 0 = x_i, 1 = v_i."""
    for i in b.steps(g.steps):
        h = g.t[i + 1] - g.t[i]
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        v1 = velocity(b, g, g.t[i], X, D)
        b.update(x=X + h * v1, slots={0: X, 1: v1})
        X, D = b.call(g.t[i + 1])
        v2 = velocity(b, g, g.t[i + 1], X, D)
        b.update(x=b.S(0) + (h / 2) * (b.S(1) + v2))
