"""Plan structure: immutable, hashable, cached, row layout, NFE accounting, noise-draw bookkeeping."""

import numpy as np
import pytest

import fastdiff as fd
from fastdiff import schedules as S


def test_plan_is_cached_hashable_and_immutable():
    p1 = fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 20)
    p2 = fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 20)
    assert p1 is p2 and hash(p1) == hash(p2) and {p1: 1}[p2] == 1
    assert p1 != fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 21)
    with pytest.raises(AttributeError):
        p1.steps = 3
    with pytest.raises(ValueError):
        p1.update[0, 0, 0] = 1.0  # read-only arrays
    assert p1.times.dtype == np.float64 and p1.update.dtype == np.float64


@pytest.mark.parametrize("solver,steps,final,nfe", [
    ("euler", 10, "zero", 10), ("heun", 10, "zero", 19), ("heun", 10, "t_min", 20),
    ("dpm_solver_2", 6, "t_min", 12), ("dpm_solver_3", 6, "t_min", 18), ("dpm_solver_3", 6, "zero", 16),
    ("rk4", 5, "t_min", 20), ("rk4", 5, "zero", 17), ("dpmpp_2m", 20, "zero", 20), ("unipc", 9, "zero", 9),
    ("pc", 7, "zero", 14), ("annealed_langevin", 4, "zero", 3 * 100 + 1), ("dpmpp_2s_ancestral", 5, "zero", 9),
])
def test_nfe(solver, steps, final, nfe):
    p = fd.plan(solver, S.EDM(), steps, final=final)
    assert p.nfe == nfe
    assert len(p.model_times) == nfe and len(p.times) == steps + 1


def test_rows_layout_and_model_times():
    p = fd.plan("dpmpp_3m", S.DiscreteVP(), 8)
    K = p.num_slots
    rows = p.rows()
    assert rows.shape == (p.num_stages, 7 + (1 + K) * (2 + K))
    np.testing.assert_array_equal(rows[:, :2], p.conv)
    np.testing.assert_array_equal(rows[:, 7:].reshape(p.update.shape), p.update)
    np.testing.assert_array_equal(p.model_times, p.times[:-1])  # one call per boundary for multistep solvers
    lip = S.RectifiedFlow.lipman(1e-3)
    q = fd.plan("flow_euler", lip, 4, prediction="flow")
    np.testing.assert_allclose(q.model_times, 1.0 - q.times[:-1])


def test_noise_draws_are_consecutive_and_skip_the_prior():
    p = fd.plan("euler_ancestral", S.EDM(), 6)
    noisy = p.draw[p.draw >= 0]
    np.testing.assert_array_equal(noisy, np.arange(1, len(noisy) + 1))
    assert p.num_draws == len(noisy) + 1
    assert p.draw[-1] == -1  # the step to sigma = 0 adds no noise (sigma_up = 0): no draw wasted
    assert fd.plan("heun", S.EDM(), 6).num_draws == 1  # deterministic: only the prior


def test_dead_slot_writes_are_dropped():
    p = fd.plan("dpmpp_2m", S.EDM(), 10)
    # the last step is first order (to sigma = 0), so neither it nor the step before needs to store D
    assert not p.writes[-2:].any()
    assert p.writes[:-2].all()


def test_final_zero_endpoint_and_t_min():
    for sch in (S.DiscreteVP(), S.ContinuousVP(), S.VE(), S.EDM(), S.RectifiedFlow()):
        p = fd.plan("euler", sch, 4, prediction="x0")
        assert (p.alphas[-1], p.sigmas[-1]) == (1.0, 0.0)
        q = fd.plan("euler", sch, 4, final="t_min", prediction="x0")
        assert q.times[-1] == sch.t_min and q.sigmas[-1] > 0


def test_solver_list_and_options():
    for name in ["ddpm", "ddim", "euler", "heun", "rk4", "euler_maruyama", "pc", "annealed_langevin",
                 "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
                 "dpmpp_2s_ancestral", "euler_ancestral", "flow_euler", "flow_heun", "unipc"]:
        assert name in fd.SOLVERS
    assert fd.solver_options("ddim") == {"eta": 0.0}
    assert fd.solver_options("pc")["corrector_steps"] == 1


def test_every_solver_builds_on_every_schedule_or_explains():
    for sch in (S.DiscreteVP(), S.ContinuousVP(), S.SubVP(), S.VE(), S.EDM(), S.RectifiedFlow(),
                S.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True)):
        for solver in fd.SOLVERS:
            try:
                p = fd.plan(solver, sch, 5, prediction="v")
            except ValueError as e:
                # only schedules that reach alpha = 0 may refuse, and they must say so
                assert sch.alpha(sch.t_max) == 0.0, (solver, sch, e)
                assert "alpha" in str(e)
                continue
            assert np.all(np.isfinite(p.rows()))


def test_stage_step_marks_the_grid_interval_of_each_stage():
    p = fd.plan("heun", S.EDM(), 4, s_churn=2.0)  # churn before step 0: a stage without model call
    assert not p.calls_model[0] and p.stage_step[0] == 0
    # two model calls per step, the last step (to sigma = 0) one
    np.testing.assert_array_equal(p.stage_step[p.calls_model], [0, 0, 1, 1, 2, 2, 3])
    a = fd.plan("annealed_langevin", S.VE(), 3, corrector_steps=2, final="t_min")
    np.testing.assert_array_equal(a.stage_step, [0, 0, 1, 1, 2, 2])


def test_boundaries_give_the_steps_between_arbitrary_times():
    vp = fd.schedules.DiscreteVP.scaled_linear()
    same = fd.plan("ddim", vp, boundaries=[999, 666, 333, -1])
    ref = fd.plan("ddim", vp, timesteps=[999, 666, 333])
    assert np.array_equal(same.rows(), ref.rows()) and same.final == "zero"
    # one DDIM step 666 -> 333 is the middle stage of the chain; ending at t_min = 0 is final="t_min"
    one = fd.plan("ddim", vp, boundaries=[666, 333])
    assert np.array_equal(one.rows()[0], ref.rows()[1])
    assert fd.plan("ddim", vp, boundaries=[333, 0]).final == "t_min"
    for bad in ([999], [333, 666], [999, float("nan")], [1500, 3], [999, -0.5]):
        with pytest.raises(ValueError, match="boundaries="):
            fd.plan("ddim", vp, boundaries=bad)
    with pytest.raises(ValueError, match="exactly one"):
        fd.plan("ddim", vp, boundaries=[999, -1], timesteps=[999])


def test_shared_rows_keep_unwritten_slots():
    p = fd.plan("dpmpp_3m", fd.schedules.DiscreteVP.scaled_linear(), 6)
    K0 = p.num_slots
    for K in (K0, K0 + 2):
        shared = p.shared_rows(K).reshape(p.num_stages, -1)
        M = shared[:, 7:].reshape(p.num_stages, 1 + K, 2 + K)
        assert np.array_equal(shared[:, :7], p.rows()[:, :7])
        assert np.array_equal(M[:, : 1 + K0, : 2 + K0][:, 0], p.update[:, 0])  # the x' row is the plan's
        for k in range(p.num_stages):
            for i in range(K):
                want = p.update[k, 1 + i] if i < K0 and p.writes[k, i] else np.eye(2 + K)[2 + i][: 2 + K0]
                got = M[k, 1 + i, : 2 + K0] if i < K0 else M[k, 1 + i, 2 + i]
                if i < K0:
                    assert np.array_equal(got, want)
                else:
                    assert got == 1.0 and np.count_nonzero(M[k, 1 + i]) == 1
    with pytest.raises(ValueError, match="below"):
        p.shared_rows(K0 - 1)


# ---- the Plan API the integrations build on --------------------------------------------------------------------


def _apply_rows(rows, K, x, D, slots):
    """One stage by the row contract, written out here (no noise, no Langevin): returns (x', slots')."""
    cx, co = rows[0], rows[1]
    M = rows[7:].reshape(1 + K, 2 + K)
    regs = [x, D] + list(slots)
    new = [sum(M[r, c] * regs[c] for c in range(2 + K)) for r in range(1 + K)]
    return new[0], new[1:]


def test_stage_flags_are_named_and_union_ors_them():
    p = fd.plan("dpmpp_3m", S.EDM(), 6)
    f = p.stage_flags[2]
    from fastdiff.plan import StageFlags
    assert isinstance(f, StageFlags) and isinstance(f, tuple)
    assert (f.slot_reads, f.slot_writes, f.use_out, f.noise, f.langevin) == tuple(f) == (f[0], f[1], f[2], f[3], f[4])
    assert f.slot_reads == p.slot_reads(2) and f.slot_writes == p.slot_writes(2)
    a, b, c = StageFlags(0b01, 0b10, False, True, False), StageFlags(0b100, 0, True, False, False), \
        StageFlags(0, 0b1, False, False, True)
    assert a.union(b, c) == StageFlags(0b101, 0b11, True, True, True)
    assert a.union() == a and isinstance(a.union(b), StageFlags)
    copy_only = StageFlags(0, 0, False, False, False)
    assert copy_only.union(copy_only) == copy_only
    churn = fd.plan("heun", S.EDM(), 4, s_churn=2.0).stage_flags[0]  # a stage without model call that adds noise
    assert churn == StageFlags(0, 0, False, True, False)


def test_data_coefs_and_transitions_are_the_old_conv_and_update():
    p = fd.plan("heun", S.EDM(), 5)
    assert p.conv is p.data_coefs and p.update is p.transitions
    assert p.data_coefs.shape == (p.num_stages, 2)
    assert p.transitions.shape == (p.num_stages, 1 + p.num_slots, 2 + p.num_slots)


def test_identity_row_changes_nothing():
    from fastdiff.plan import identity_row
    rng = np.random.default_rng(0)
    for K in (0, 1, 3):
        row = identity_row(K)
        assert row.shape == (7 + (1 + K) * (2 + K),) and not row[:7].any()
        x, D, slots = rng.normal(size=5), rng.normal(size=5), list(rng.normal(size=(K, 5)))
        x2, s2 = _apply_rows(row, K, x, D, slots)
        assert np.array_equal(x2, x) and all(np.array_equal(a, b) for a, b in zip(s2, slots))


def test_x0_input_rows_take_the_output_as_data_estimate():
    from fastdiff.plan import x0_input_rows
    p = fd.plan("dpmpp_2m", S.DiscreteVP(), 5)
    rows = x0_input_rows(p.rows())
    assert np.all(rows[:, 0] == 0) and np.all(rows[:, 1] == 1)
    assert np.array_equal(rows[:, 2:], p.rows()[:, 2:])
    assert not np.all(p.rows()[:, 1] == 1)  # a copy: the plan's rows are untouched


@pytest.mark.parametrize("solver,sch", [("heun", S.EDM()), ("dpmpp_3m", S.DiscreteVP.scaled_linear()),
                                         ("euler_ancestral", S.DiscreteVP()), ("unipc", S.ContinuousVP())])
def test_fold_rows_equals_the_plan_rows_on_rescaled_samples(solver, sch):
    """Folded rows applied to y give the plan's rows applied to x = a_in y, divided by a_out (slots unscaled)."""
    from fastdiff.plan import fold_rows
    p = fd.plan(solver, sch, 7)
    K = p.num_slots + 1  # also in a wider layout
    rng = np.random.default_rng(1)
    S_ = p.num_stages
    a_in, a_out = rng.uniform(0.3, 3.0, S_), rng.uniform(0.3, 3.0, S_)
    folded = fold_rows(p.shared_rows(K), K, a_in, a_out)
    assert np.array_equal(folded, p.folded_rows(a_in, a_out, K))
    shared = p.shared_rows(K)
    for k in range(S_):
        y, out, slots = rng.normal(size=9), rng.normal(size=9), list(rng.normal(size=(K, 9)))
        x = a_in[k] * y
        D_plan = shared[k, 0] * x + shared[k, 1] * out
        D_fold = folded[k, 0] * y + folded[k, 1] * out
        np.testing.assert_allclose(D_fold, D_plan, rtol=1e-12, atol=1e-12)
        x2, s2 = _apply_rows(shared[k], K, x, D_plan, slots)
        y2, t2 = _apply_rows(folded[k], K, y, D_plan, slots)
        np.testing.assert_allclose(y2, x2 / a_out[k], rtol=1e-12, atol=1e-12)
        for a, b in zip(t2, s2):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(folded[k, 2], shared[k, 2] / a_out[k], rtol=1e-15)  # noise gain in y units


def test_fold_rows_rejects_what_it_cannot_fold():
    from fastdiff.plan import fold_rows
    p = fd.plan("pc", S.VE(), 3)
    with pytest.raises(ValueError, match="Langevin"):
        fold_rows(p.rows(), p.num_slots, 1.0, 2.0)
    with pytest.raises(ValueError, match="rows must be"):
        fold_rows(p.rows(), p.num_slots + 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="a_out"):
        fold_rows(p.rows(), p.num_slots, 1.0, 0.0)
