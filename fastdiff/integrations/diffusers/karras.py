"""k-diffusion's samplers as diffusers ships them: LMS, KDPM2 (DPM-2), KDPM2 ancestral and DPMSolverSDE (DPM-Solver++
SDE), each on diffusers' own noise levels in y = x / alpha (the Euler family's sample space, folded into the rows).

KDPM2, KDPM2 ancestral and DPMSolverSDE take two ``step`` calls per step (the second at an intermediate noise level
that diffusers interleaves into its timesteps) and one for the step to sigma = 0; the plan's two stages of a step are
those two calls, so stage k of the program is the k-th call.  The intermediate levels folded into the rows are
diffusers' own float32 values.
"""

from __future__ import annotations

import numpy as np
import torch

from ._base import GAIN, _d, _f64
from .sigma_indexed import _EulerFamily


def _alpha(s):
    return 1.0 / np.sqrt(1.0 + np.asarray(s, dtype=np.float64) ** 2)


class _TwoCallEuler(_EulerFamily):
    """Schedulers whose steps are two calls (sigma -> intermediate -> next sigma) but the last (sigma -> 0, one call);
    the plan runs on the base grid ``sigmas[0::2]`` and the rows fold with the levels each call reads and lands on."""

    def _fd_mids(self) -> np.ndarray:  # pragma: no cover - abstract
        """diffusers' intermediate level of each base step but the last ([n - 1], float64 of its float32)."""
        raise NotImplementedError

    def _fd_base(self) -> np.ndarray:
        """The base grid [n + 1]: diffusers' sigmas of the first calls, then 0."""
        n = (len(self._fd_ts_host) + 1) // 2
        return np.concatenate([self._fd_sig_host[0 : 2 * n - 1 : 2], [0.0]])

    def _fd_check_begin(self, begin):
        if begin % 2:
            raise ValueError(f"{type(self).__name__}: begin_index must be even (the first call of a step), got "
                             f"{begin}")

    def _fd_grid(self, begin):
        self._fd_check_begin(begin)
        return self._fd_base()[begin // 2 :]

    def _fd_levels(self, begin):
        """(levels read, levels landed on) [calls] of the calls from ``begin`` on."""
        self._fd_check_begin(begin)
        base, mids = self._fd_base(), self._fd_mids()
        n = len(base) - 1
        read = np.empty(2 * n - 1)
        read[0::2], read[1::2] = base[:-1], mids
        land = np.empty(2 * n - 1)
        land[0::2], land[1::2] = np.concatenate([mids, [0.0]]), base[1:-1]
        return read[begin:], land[begin:]

    def _fd_fold(self, begin):
        read, land = self._fd_levels(begin)
        return {"a_in": _alpha(read), "a_out": _alpha(land)}


class LMSDiscreteScheduler(_EulerFamily, _d.LMSDiscreteScheduler):
    """diffusers' LMS (Adams-Bashforth in sigma over the last ``order`` slopes, the Lagrange polynomial integrated
    between the sigmas, on the step to sigma = 0 too) on fastdiff's ``lms`` rows."""

    _output = "scheduling_lms_discrete.LMSDiscreteSchedulerOutput"

    def _fd_solver(self, begin, eta=None):
        order = 4 if eta is None else eta  # the program key's second entry: step's order (None: 4)
        # a late start (set_begin_index): diffusers' Lagrange nodes reach back before it
        past = tuple(float(v) for v in self._fd_sig_host[max(0, begin - order + 1) : begin])
        return "lms", {"order": order, "past_sigmas": past}

    def step(self, model_output, timestep, sample, order: int = 4, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        if not isinstance(order, int) or not 1 <= order <= 6:
            raise ValueError(f"order must be an integer in 1..6, got {order!r}")
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict, eta=None if order == 4 else order)


class KDPM2DiscreteScheduler(_TwoCallEuler, _d.KDPM2DiscreteScheduler):
    """diffusers' KDPM2 (k-diffusion's sample_dpm_2: a midpoint step in log sigma) on fastdiff's ``dpm_2`` rows; its
    second call of a step is at the geometric mean of the step's sigmas (diffusers' float32 ``sigmas_interpol``)."""

    _output = "scheduling_k_dpm_2_discrete.KDPM2DiscreteSchedulerOutput"

    def _fd_mids(self):
        n = (len(self._fd_ts_host) + 1) // 2
        return _f64(self.sigmas_interpol)[1 : 2 * n - 1 : 2]

    def _fd_solver(self, begin, eta=None):
        return "dpm_2", {}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


class KDPM2AncestralDiscreteScheduler(_TwoCallEuler, _d.KDPM2AncestralDiscreteScheduler):
    """diffusers' KDPM2 ancestral (k-diffusion's sample_dpm_2_ancestral, eta = 1) on fastdiff's ``dpm_2_ancestral``
    rows: DPM-2 to sigma_down, then noise sigma_up on the second call of each step; the step to sigma = 0 is Euler
    to the data estimate, without noise."""

    _output = "scheduling_k_dpm_2_ancestral_discrete.KDPM2AncestralDiscreteSchedulerOutput"

    def _fd_mids(self):
        n = (len(self._fd_ts_host) + 1) // 2
        return _f64(self.sigmas_interpol)[0 : 2 * n - 2 : 2]

    def _fd_solver(self, begin, eta=None):
        return "dpm_2_ancestral", {"eta": 1.0}

    def _fd_peer_draws(self, n):
        return [k % 2 == 1 for k in range(n)]  # diffusers draws on each second call (odd stage from an even begin)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)


def _sde_midpoints(sigmas32: torch.Tensor) -> np.ndarray:
    """DPMSolverSDE's midpoint sigma_fn(t + (t_next - t) / 2) with t = -log sigma, in float32 as diffusers forms it,
    of each step between positive sigmas."""
    s, s_next = sigmas32[:-1], sigmas32[1:]
    t, t_next = s.log().neg(), s_next.log().neg()
    return _f64((t + (t_next - t) * 0.5).neg().exp())


class DPMSolverSDEScheduler(_TwoCallEuler, _d.DPMSolverSDEScheduler):
    """diffusers' DPMSolverSDE (k-diffusion's sample_dpmpp_sde with r = 1/2, eta = 1) on fastdiff's ``dpmpp_sde``
    rows.

    diffusers draws the two noises of a step from a torchsde Brownian tree seeded with ``noise_sampler_seed``.
    Without that seed (diffusers then seeds the tree at random) the noises are Philox draws per sample (``seeds=``)
    combined to the tree's joint law (each N(0, I), correlation sqrt((sigma - sigma_mid) / (sigma - sigma_next))
    within a step, independent across steps): the same law, other numbers than torchsde's.  With
    ``noise_sampler_seed`` set (and torchsde installed) a run on the scheduler's own counter takes diffusers' own
    tree draws instead, so it reproduces diffusers' numbers; per-sample steps and ``state=`` use Philox.
    """

    _output = "scheduling_dpmsolver_sde.DPMSolverSDESchedulerOutput"

    def _fd_mids(self):
        return _sde_midpoints(torch.as_tensor(self._fd_base()[:-1], dtype=torch.float32))

    def _fd_solver(self, begin, eta=None):
        """``eta``, the program key's second entry: None (s_noise 1), s_noise, or ("tree", s_noise): rows without
        noise (s_noise 0 in the plan), whose gains _fd_build sets to diffusers' sigma_up s_noise."""
        s_noise = 0.0 if isinstance(eta, tuple) else 1.0 if eta is None else eta
        return "dpmpp_sde", {"eta": 1.0, "s_noise": s_noise, "r": 0.5}

    def _fd_build(self, begin, eta):
        """The program of ``_fd_solver``'s rows; for the tree's draws (given as variance noise, eta = ("tree",
        s_noise)) the rows' noise gains are diffusers' float32 sigma_up times s_noise."""
        tree = isinstance(eta, tuple)
        prog = super()._fd_build(begin, eta)
        if tree:
            s_noise = eta[1]
            read, land = self._fd_levels(begin)
            base = np.repeat(self._fd_base()[:-1], 2)[begin : begin + len(read)]  # each call's step start
            s = torch.as_tensor(base, dtype=torch.float32)
            to = torch.as_tensor(land, dtype=torch.float32)
            up = torch.minimum(to, (to**2 * (s**2 - to**2) / s**2) ** 0.5)  # diffusers' float32 sigma_up
            gain = _f64(up) * s_noise
            gain[land == 0] = 0.0
            prog.rows64[:, GAIN] = gain  # the program is new: not yet on a device
        return prog

    def _fd_take_schedule(self):
        super()._fd_take_schedule()
        self.noise_sampler = None  # diffusers makes a new tree after set_timesteps

    def step(self, model_output, timestep, sample, return_dict: bool = True, s_noise: float = 1.0, *, seeds=None,
             step_index=None, state=None):
        if not isinstance(s_noise, (int, float)) or not s_noise >= 0:
            raise ValueError(f"s_noise must be a number >= 0, got {s_noise!r}")
        eta = None if s_noise == 1.0 else float(s_noise)
        variance_noise = None
        if self.config.noise_sampler_seed is not None and state is None and step_index is None and not (
                isinstance(timestep, torch.Tensor) and timestep.numel() > 1):
            eta = ("tree", float(s_noise))
            variance_noise = self._fd_tree_noise(timestep, sample, eta)
        return self._fd_step(model_output, timestep, sample, variance_noise=variance_noise, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict, eta=eta)

    def _fd_tree_noise(self, timestep, sample, eta):
        """diffusers' tree draw of this call: W(sigma -> sigma_mid) on a step's first call, W(sigma -> sigma_next)
        on its second (None on the step to sigma = 0, which adds no noise)."""
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        _, k = self._fd_where(timestep, None, None, eta)
        k += self._fd_begin
        sig = torch.as_tensor(self._fd_sig_host, dtype=torch.float32)  # diffusers' sigmas (float32)
        first = k % 2 == 0
        sigma, sigma_next = (sig[k], sig[k + 1]) if first else (sig[k - 1], sig[k])
        if sigma_next == 0:
            return None
        if self.noise_sampler is None:
            self.noise_sampler = BrownianTreeNoiseSampler(sample, sig[sig > 0].min().item(), sig.max().item(),
                                                          self.config.noise_sampler_seed)
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        if first:
            t_next = t + (t_next - t) * 0.5
        return self.noise_sampler(t.neg().exp(), t_next.neg().exp())
