"""Multistep schedulers on diffusers' noise levels: DEIS (log-rho), iPNDM, PNDM / PLMS, SA-Solver."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...plan import ROW_HEADER, StageFlags
from ...solvers.adams import AB_WEIGHTS
from ...solvers.builder import Lin
from ._base import _d, _f64, _FastdiffStep, _numbered_draws, _Program, _unsupported
from .sigma_indexed import _SigmaScheduler


class DEISMultistepScheduler(_SigmaScheduler, _d.DEISMultistepScheduler):
    """diffusers' DEIS multistep (log-rho, orders 1-3, every sigma option) on fastdiff's ``deis_logrho`` rows."""

    _unknown_timestep_is_last = True

    def _fd_check_config(self):
        c = self.config
        if c.algorithm_type != "deis" or c.solver_type != "logrho":
            _unsupported(f"algorithm_type={c.algorithm_type!r} / solver_type={c.solver_type!r} (diffusers itself "
                         "only steps 'deis' / 'logrho')")

    def _fd_solver(self, begin, eta=None):
        c = self.config
        # diffusers lowers the last two orders when its whole schedule has fewer than 15 steps
        cool_down = bool(c.lower_order_final) and len(self._fd_ts_host) < 15
        return "deis_logrho", {"order": int(c.solver_order), "lower_order_final": cool_down}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


# ---------------------------------------------------------------------------------------------------------------
# Rows written in diffusers' own arithmetic
# ---------------------------------------------------------------------------------------------------------------

X, OUT = Lin({"x": 1.0}), Lin({"D": 1.0})  # the sample and the raw model output (the row's D register: cx 0, co 1)


def _slot(i):
    return Lin({i: 1.0})


def _raw_row(num_slots, x_new, slots_new):
    """(flat row, flags) of a stage x' = ``x_new``, S_i' = ``slots_new[i]`` (others kept), the D register being the
    raw model output; ``x_new`` and the slot values are ``Lin`` over x, D (= out) and the slots."""
    K = num_slots
    M = np.zeros((1 + K, 2 + K))
    cols = {"x": 0, "D": 1, **{i: 2 + i for i in range(K)}}
    for row, lin in [(0, x_new)] + [(1 + i, v) for i, v in slots_new.items()]:
        for reg, v in lin.c.items():
            M[row, cols[reg]] += v
    for i in range(K):
        if i not in slots_new:
            M[1 + i, 2 + i] = 1.0
    reads = sum(1 << i for i in range(K) if np.any(M[[0] + [1 + j for j in slots_new], 2 + i] != 0))
    writes = sum(1 << i for i in slots_new)
    head = np.zeros(len(ROW_HEADER))
    head[1] = 1.0  # D = out
    return np.concatenate([head, M.ravel()]), StageFlags(reads, writes, True, False, False)


# ---------------------------------------------------------------------------------------------------------------
# iPNDM
# ---------------------------------------------------------------------------------------------------------------


class IPNDMScheduler(_FastdiffStep, _d.IPNDMScheduler):
    """diffusers' iPNDM (fourth-order Adams-Bashforth on ets = beta x + alpha out, its own trigonometric tables) in
    diffusers' arithmetic: rows of every (step, order) pair; the order is diffusers' min(4, calls since
    set_timesteps + 1), so a second loop after resetting the step index continues the history as diffusers' does.
    The last three ets sit in three slots shifted on each call."""

    @property
    def add_noise(self):
        # diffusers' iPNDM has no add_noise (its schedule has no alphas_cumprod to noise with): keep it absent, as
        # there, rather than inherit the mixin's, which would fail on the missing table.  (diffusers' config
        # __getattr__ then raises its usual "object has no attribute 'add_noise'".)
        raise AttributeError("add_noise")

    def _fd_take_schedule(self):
        super()._fd_take_schedule()
        self._fd_calls = 0  # diffusers' len(self.ets): calls since set_timesteps

    def _fd_build(self, begin, eta):
        alphas, betas = _f64(self.alphas), _f64(self.betas)  # diffusers' float32 tables, [N + 1]
        N = len(self._fd_ts_host)
        rows, flags = [], []
        for o in range(1, 5):
            for k in range(N):
                a, b, na, nb = alphas[k], betas[k], alphas[k + 1], betas[k + 1]
                ets = b * X + a * OUT
                w = AB_WEIGHTS[o]
                e = w[0] * ets
                for j in range(1, o):
                    e = e + w[j] * _slot(j - 1)
                # diffusers: pred = (x - sigma e) / max(alpha, 1e-8); x' = alpha' pred + sigma' e
                x_new = (na / max(a, 1e-8)) * (X - b * e) + nb * e
                row, f = _raw_row(3, x_new, {0: ets, 1: _slot(0), 2: _slot(1)})
                rows.append(row)
                flags.append(f)
        draws = np.full(len(rows), -1)
        return _Program(rows, flags, draws, 3, np.tile(self._fd_ts_host, 4))

    def _fd_where(self, timestep, step_index, state, eta=None):
        prog, k = super()._fd_where(timestep, step_index, state, eta)
        N = len(self._fd_ts_host)
        if isinstance(k, int):
            if step_index is not None:
                calls = k  # an explicit step: the order of a run from step 0
            elif state is not None:
                calls = state.step_index - state.begin_index
            else:
                calls = self._fd_calls
            return prog, (min(4, calls + 1) - 1) * N + k
        kind, v = k
        dev = prog.on(v.device, torch.float32)
        if kind == "device":  # timesteps [B] -> steps, on the device
            t = v.to(dev["timesteps"].device, torch.float64).reshape(-1)
            v = (dev["timesteps"][None, :N] == t[:, None]).to(torch.int8).argmax(dim=1)
        v = v.to(dev["timesteps"].device).long().reshape(-1)
        return prog, ("index", (torch.clamp(v + 1, max=4) - 1) * N + v)

    def _fd_advance(self, state, explicit):
        super()._fd_advance(state, explicit)
        if state is None and not explicit:
            self._fd_calls += 1

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


# ---------------------------------------------------------------------------------------------------------------
# PNDM / PLMS
# ---------------------------------------------------------------------------------------------------------------

# slots of the PNDM rows: the last three ets (a shift register, E1 the latest), cur_sample, cur_model_output
_E1, _E2, _E3, _CS, _CM = range(5)


class PNDMScheduler(_FastdiffStep, _d.PNDMScheduler):
    """diffusers' PNDM (pseudo Runge-Kutta warm-up, then PLMS; or skip_prk_steps) in diffusers' arithmetic: each
    call k of diffusers' counter is a row over x, the model output and five slots (the last three ets, cur_sample,
    cur_model_output).  Rows are built for the timestep diffusers' schedule gives call k; ``step_prk`` /
    ``step_plms`` called with another timestep or out of their turn get a row of their own for that call."""

    def _fd_take_schedule(self):
        super()._fd_take_schedule()
        self._fd_mode = None  # "prk" / "plms" when called through step_prk / step_plms

    def _fd_natural_mode(self, k):
        return "prk" if k < len(self.prk_timesteps) and not self.config.skip_prk_steps else "plms"

    def _fd_levels(self, t):
        """alpha_bar at an integer timestep, diffusers' final_alpha_cumprod below 0."""
        if t < 0:
            return float(self.final_alpha_cumprod)
        return float(self._fd_alphas_cumprod[int(t)])

    def _fd_prev(self, sample, t, t_prev, e):
        """diffusers' _get_prev_sample (PNDM's eq. (9)) on Lin operands."""
        ab_t, ab_p = self._fd_levels(t), self._fd_levels(t_prev)
        if self.config.prediction_type == "v_prediction":
            e = ab_t**0.5 * e + (1.0 - ab_t) ** 0.5 * sample
        elif self.config.prediction_type != "epsilon":
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon` or "
                             "`v_prediction`")
        denom = ab_t * (1.0 - ab_p) ** 0.5 + (ab_t * (1.0 - ab_t) * ab_p) ** 0.5
        return (ab_p / ab_t) ** 0.5 * sample - ((ab_p - ab_t) / denom) * e

    def _fd_call_row(self, mode, k, t):
        """(row, flags) of diffusers' call ``k`` of ``step_prk`` / ``step_plms`` with timestep ``t``."""
        N, n = self.config.num_train_timesteps, self.num_inference_steps
        E1, E2, E3, CS, CM = (_slot(i) for i in (_E1, _E2, _E3, _CS, _CM))
        push = {_E1: OUT, _E2: E1, _E3: E2}  # ets.append(model_output)
        if mode == "prk":
            t_prev = t - (0 if k % 2 else N // n // 2)
            t_used = float(self.prk_timesteps[k // 4 * 4])
            c = k % 4
            if c == 0:
                x_new = self._fd_prev(X, t_used, t_prev, OUT)
                # cur_model_output is 0 here in every run that calls its PRK steps in order (set_timesteps and the
                # fourth call reset it): writing out / 6 keeps a run independent of the slots' earlier contents
                slots = {**push, _CS: X, _CM: OUT / 6.0}
            elif c in (1, 2):
                x_new = self._fd_prev(CS, t_used, t_prev, OUT)
                slots = {_CM: CM + OUT / 3.0}
            else:
                x_new = self._fd_prev(CS, t_used, t_prev, CM + OUT / 6.0)
                slots = {_CM: Lin()}
            return _raw_row(5, x_new, slots)
        stride = N // n
        t_prev, t_used = t - stride, t
        if k == 1:
            t_prev, t_used = t, t + stride
        # len(ets) after this call: PRK leaves three, then every call appends (the list keeps four)
        if not self.config.skip_prk_steps:
            size = 4
        else:
            size = 1 if k <= 1 else min(k, 4)
        slots = {} if k == 1 else dict(push)
        sample = X
        if size == 1 and k == 0:
            e = OUT
            slots[_CS] = X
        elif size == 1 and k == 1:
            e = (OUT + E1) / 2.0
            sample = CS
        elif size == 2:
            e = (3.0 * OUT - E1) / 2.0
        elif size == 3:
            e = (23.0 * OUT - 16.0 * E1 + 5.0 * E2) / 12.0
        else:
            e = (55.0 * OUT - 59.0 * E1 + 37.0 * E2 - 9.0 * E3) / 24.0
        return _raw_row(5, self._fd_prev(sample, t_used, t_prev, e), slots)

    def _fd_build(self, begin, eta):
        self._fd_alphas_cumprod = _f64(self.alphas_cumprod)
        ts = self._fd_ts_host
        rows, flags = zip(*(self._fd_call_row(self._fd_natural_mode(k), k, float(t)) for k, t in enumerate(ts)))
        return _Program(rows, flags, np.full(len(ts), -1), 5, ts)

    def _fd_counter(self, timestep):
        return self.counter

    def _fd_advance(self, state, explicit):
        if explicit:
            return
        if state is not None:
            state.step_index += 1
        else:
            self.counter += 1

    def _fd_where(self, timestep, step_index, state, eta=None):
        prog, k = super()._fd_where(timestep, step_index, state, eta)
        mode, self._fd_mode = self._fd_mode, None
        if not isinstance(k, int) or step_index is not None or state is not None:
            return prog, k
        t = float(timestep.reshape(-1)[0].item() if isinstance(timestep, torch.Tensor) else timestep)
        mode = mode or self._fd_natural_mode(k)
        if k < prog.num_stages and t == prog.timesteps[k] and mode == self._fd_natural_mode(k):
            return prog, k
        key = ("call", mode, k, t)  # a call off diffusers' schedule: a one-row program of its own
        one = self._fd_programs.get(key)
        if one is None:
            self._fd_alphas_cumprod = _f64(self.alphas_cumprod)
            row, flags = self._fd_call_row(mode, k, t)
            one = self._fd_programs[key] = _Program([row], [flags], [-1], 5, [t])
        return one, 0

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)

    def step_prk(self, model_output, timestep, sample, return_dict: bool = True):
        """diffusers' pseudo Runge-Kutta call (four per step) at diffusers' counter."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._fd_mode = "prk"
        return self._fd_step(model_output, timestep, sample, return_dict=return_dict)

    def step_plms(self, model_output, timestep, sample, return_dict: bool = True):
        """diffusers' linear multistep call at diffusers' counter."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if not self.config.skip_prk_steps and len(self.ets) < 3 and self.counter < len(self.prk_timesteps):
            raise ValueError(f"{self.__class__} can only be run AFTER scheduler has been run in 'prk' mode for at "
                             "least 12 iterations See: https://github.com/huggingface/diffusers/blob/main/src/"
                             "diffusers/pipelines/pipeline_pndm.py for more information.")
        self._fd_mode = "plms"
        return self._fd_step(model_output, timestep, sample, return_dict=return_dict)


# ---------------------------------------------------------------------------------------------------------------
# SA-Solver
# ---------------------------------------------------------------------------------------------------------------


def _exp_integral(order, start, end, tau, data):
    """diffusers' SA-Solver integrals of lambda^order against the exponential weight over [start, end] (lambda):
    data prediction int e^{(1 + tau^2) l} l^n dl (after its change of variable), noise prediction int e^{-l} l^n dl
    (closed forms)."""
    fact = math.factorial(order)
    if data:
        c = 1.0 + tau * tau
        E, S = c * end, c * start

        def P(v):
            return sum((-1) ** m * fact / math.factorial(order - m) * v ** (order - m) for m in range(order + 1))

        return math.exp(E) * (P(E) - P(S) * math.exp(-(E - S))) / c ** (order + 1)

    def Q(v):
        return sum(fact / math.factorial(order - m) * v ** (order - m) for m in range(order + 1))

    return math.exp(-end) * (Q(start) * math.exp(end - start) - Q(end))


def _sa_coefficients(order, start, end, lambdas, tau, data):
    """diffusers' get_coefficients_fn: int of each Lagrange basis polynomial on ``lambdas`` times the weight."""
    out = []
    for i in range(order):
        others = [lambdas[j] for j in range(order) if j != i]
        poly = np.atleast_1d(np.poly(others)) / np.prod([lambdas[i] - v for v in others])  # descending powers
        out.append(sum(float(poly[j]) * _exp_integral(order - 1 - j, start, end, tau, data) for j in range(order)))
    return out


class SASolverScheduler(_FastdiffStep, _d.SASolverScheduler):
    """diffusers' SA-Solver (stochastic Adams predictor-corrector, data or noise prediction, orders 1-4, its
    tau_func) in diffusers' arithmetic.  Each call runs the corrector of the previous step, then the predictor.
    diffusers' corrector re-uses the previous step's noise; here it is the same step, so the corrected sample is
    x + (corrector gradient - predictor gradient) with the noise left in x: exact when ``sample`` is the previous
    call's ``prev_sample`` (a pipeline's loop), and no noise has to be stored.  Slots hold the last converted model
    outputs."""

    _stateful = True
    _unknown_timestep_is_last = True

    def _fd_check_config(self):
        c = self.config
        if c.algorithm_type == "noise_prediction" and c.prediction_type == "flow_prediction":
            raise ValueError("prediction_type given as flow_prediction must be one of `epsilon`, `sample`, or "
                             "`v_prediction` for the SASolverScheduler.")

    def _fd_levels(self):
        """(alpha, sigma, lambda) [N + 1] at diffusers' sigmas (flow sigmas: alpha = 1 - sigma)."""
        s = self._fd_sig_host
        if self.config.use_flow_sigmas:
            a, sg = 1.0 - s, s
        else:
            a = 1.0 / np.sqrt(s * s + 1.0)
            sg = s * a
        with np.errstate(divide="ignore"):
            return a, sg, np.log(a) - np.log(sg)

    def _fd_build(self, begin, eta):
        c = self.config
        data = c.algorithm_type == "data_prediction"
        p_cfg, c_cfg = int(c.predictor_order), int(c.corrector_order)
        L = max(p_cfg, c_cfg - 1)  # outputs diffusers keeps
        ts = self._fd_ts_host
        N = len(ts)
        a, sg, lam = self._fd_levels()
        taus = [float(self.tau_func(self.timesteps[k])) for k in range(N)]

        def orders(k, j):
            """(predictor order, corrector order kept for the next call) of absolute step k, call j."""
            po = min(p_cfg, N - k) if c.lower_order_final else p_cfg
            co = min(c_cfg, N - k + 1) if c.lower_order_final else c_cfg
            done = min(j, L)  # diffusers' lower_order_nums
            return min(po, done + 1), min(co, done + 2)

        def gradient(k_s, k_t, order, outputs, tau, corrector):
            """diffusers' gradient_part from sigmas[k_s] to sigmas[k_t] (k_t = k_s + 1) on ``outputs`` (newest
            first); lambdas at the interval's newest point (k_t for the corrector, k_s for the predictor) and back."""
            top = k_t if corrector else k_s
            lams = [lam[top - i] for i in range(order)]
            h = lam[k_t] - lam[k_s]
            coef = _sa_coefficients(order, lam[k_s], lam[k_t], lams, tau, data)
            if data and order == 2:  # diffusers' UniPC-like O(h^3) term
                q = 1.0 + tau * tau
                if corrector:
                    extra = math.exp(q * lam[k_t]) * (h / 2 - (h * q - 1 + math.exp(-q * h)) / (q * q * h))
                else:
                    extra = (math.exp(q * lam[k_t]) * (h * h / 2 - (h * q - 1 + math.exp(-q * h)) / (q * q))
                             / (lam[k_s] - lam[k_s - 1]))
                coef[0] += extra
                coef[1] -= extra
            scale = ((1 + tau * tau) * sg[k_t] * math.exp(-tau * tau * lam[k_t]) if data
                     else -(1 + tau * tau) * a[k_t])
            g = Lin()
            for i in range(order):
                g = g + (scale * coef[i]) * outputs[i]
            return g

        rows, flags = [], []
        hist = [_slot(i) for i in range(L)]  # converted outputs of the calls before, newest first
        for j, k in enumerate(range(begin, N)):
            # the converted model output at sigmas[k]: the data estimate, or the noise estimate
            a_k, s_k = a[k], sg[k]
            if c.prediction_type == "epsilon":
                cx, co = 1.0 / a_k, -s_k / a_k
            elif c.prediction_type == "sample":
                cx, co = 0.0, 1.0
            elif c.prediction_type == "v_prediction":
                cx, co = a_k, -s_k
            elif c.prediction_type == "flow_prediction":
                cx, co = 1.0, -self._fd_sig_host[k]
            else:
                raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon`, "
                                 "`sample`, `v_prediction`, or `flow_prediction` for the SASolverScheduler.")
            m = OUT if data else (X - a_k * OUT) / s_k  # OUT is the D register here
            outputs = [m] + hist
            x_c = X
            if j >= 1:  # corrector of the step from k - 1 to k, with the previous call's predictor taken out
                p_prev, c_prev = orders(k - 1, j - 1)
                tau_prev = taus[k - 1]
                x_c = (X + gradient(k - 1, k, c_prev, outputs, tau_prev, True)
                       - gradient(k - 1, k, p_prev, hist, tau_prev, False))
            p_k, _ = orders(k, j)
            tau = taus[k]
            h = lam[k + 1] - lam[k]
            if data:
                A = math.exp(-tau * tau * h) * sg[k + 1] / sg[k]
                gain = sg[k + 1] * math.sqrt(max(1.0 - math.exp(-2.0 * tau * tau * h), 0.0))
            else:
                A = a[k + 1] / a[k]
                gain = tau * sg[k + 1] * math.sqrt(max(math.exp(2.0 * h) - 1.0, 0.0))
            x_new = A * x_c + gradient(k, k + 1, p_k, outputs, tau, False)
            slots = {i: outputs[i] for i in range(L)}  # shift: slot i <- the output i calls back
            row, f = _raw_row(L, x_new, slots)
            row[0], row[1], row[2] = cx, co, gain
            rows.append(row)
            flags.append(f._replace(noise=gain != 0.0))
        return _Program(rows, flags, _numbered_draws(flags), L, ts[begin:], peer_draws=[True] * (N - begin))

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        """diffusers' SA-Solver step; without a ``generator`` the noise is fastdiff's Philox draw of ``seeds``."""
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)
