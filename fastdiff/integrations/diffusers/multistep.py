"""Multistep schedulers on diffusers' noise levels: DEIS (log-rho), iPNDM, PNDM / PLMS."""

from __future__ import annotations

import numpy as np
import torch

from ...plan import ROW_HEADER, StageFlags
from ...solvers.adams import AB_WEIGHTS
from ...solvers.builder import Lin
from ._base import _d, _f64, _FastdiffStep, _Program, _unsupported
from .sigma_indexed import _SigmaScheduler


class DEISMultistepScheduler(_SigmaScheduler, _d.DEISMultistepScheduler):
    """diffusers' DEIS multistep (log-rho, orders 1-3, every sigma option) on fastdiff's ``deis_logrho`` rows."""

    _unknown_timestep_is_last = True

    def _fd_check_config(self):
        c = self.config
        if c.algorithm_type != "deis" or c.solver_type != "logrho":
            _unsupported(f"algorithm_type={c.algorithm_type!r} / solver_type={c.solver_type!r} (diffusers itself "
                         "only steps 'deis' / 'logrho')")

    def _fd_solver(self, begin):
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

    _output = "scheduling_utils.SchedulerOutput"

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
