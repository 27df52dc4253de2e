"""Flow-matching ODE solvers in the schedule's own time t (Lipman et al. 2023).

The velocity dx/dt = alpha'(t) D + sigma'(t) eps_hat is affine in (x, D) and finite at alpha = 0 (t = 1 on
rectified flow), so these solvers start on pure noise.  A step that ends on the clean point returns D.
"""

from .builder import eps_hat
from .registry import solver


def velocity(g, t, X, D):
    sch = g.schedule
    a, s = sch.alpha(t), sch.sigma(t)
    return sch.dalpha(t) * D + sch.dsigma(t) * eps_hat(X, D, a, s)


@solver("flow_euler", alpha_zero=True)
def flow_euler(b, g):
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        b.update(x=X + (g.t[i + 1] - g.t[i]) * velocity(g, g.t[i], X, D))


@solver("flow_heun", alpha_zero=True)
def flow_heun(b, g):
    """Heun's method: Euler predictor, trapezoidal corrector."""
    x_i, v_i = b.slot("x_i"), b.slot("v_i")
    for i in b.steps(g.steps):
        h = g.t[i + 1] - g.t[i]
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        v1 = velocity(g, g.t[i], X, D)
        b.update(x=X + h * v1, slots={x_i: X, v_i: v1})
        X, D = b.call(g.t[i + 1])
        v2 = velocity(g, g.t[i + 1], X, D)
        b.update(x=x_i + (h / 2) * (v_i + v2))
