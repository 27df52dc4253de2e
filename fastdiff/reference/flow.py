"""Flow-matching ODE samplers in the schedule's own time t (Lipman et al. 2023; Liu et al. 2023).

The model's velocity field is dx/dt = alpha'(t) x0 + sigma'(t) eps along x_t = alpha(t) x0 + sigma(t) eps (for a
"flow" model, model_time_rate times its output); sampling integrates it from t_0 down to t_N.
"""

from __future__ import annotations


def flow_euler(run, x):
    """Flow matching, explicit Euler on dx/dt = v(x, t) (Lipman et al. 2023, Sec. 6 "Sampling")."""
    g = run.grid
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            x = out.x0  # a step to the clean point returns D
            continue
        # x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)
        x = x + (g.t[i + 1] - g.t[i]) * out.velocity
    return x


def flow_heun(run, x):
    """Flow matching, Heun's method (explicit trapezoid) on dx/dt = v(x, t) (Karras et al. 2022, Alg. 1 in t)."""
    g = run.grid
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            x = out.x0
            continue
        h = g.t[i + 1] - g.t[i]
        v_1 = out.velocity
        # predictor: Euler to t_{i+1}
        x_pred = x + h * v_1
        # corrector: trapezoid with the velocity at the predicted point
        v_2 = run.eval(x_pred, g.t[i + 1]).velocity
        x = x + (h / 2) * (v_1 + v_2)
    return x
