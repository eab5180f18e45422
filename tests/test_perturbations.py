"""How each kind of perturbation moves the parameters (stages/perturbations.py): coordinates by
their exact steps, displacements the device really takes, and non-finite values refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from jgc._src.compat import enable_x64
from jgc._src.evaluators import factory
from jgc._src.report.vocab import Mode
from jgc._src.stages import differences as dq
from jgc._src.stages import perturbations as pt
from jgc._src.stages import plan as pl
from jgc._src.stages.split import InputError, split_checked

PARAMS = {"a": np.array([0.5, -1.25, 3.0]), "b": np.array([[2.0, 0.25]])}


def loss(p):
    return jnp.sum(jnp.sin(p["a"]) ** 2) + jnp.sum(p["b"] ** 3)


def host_loss(flat):
    return float(np.sum(np.sin(flat[:3]) ** 2) + np.sum(flat[3:] ** 3))


def coordinates():
    sp = split_checked(PARAMS)
    plan = pl.make_plan(sp, mode=Mode.FULL, x64=True, eps=None, samples=0, seed=0)
    return sp, plan, factory.make_evaluator(loss, sp, plan.theta, plan.dtypes, ())


def test_coordinates_move_each_entry_by_its_exact_steps():
    with enable_x64(True):
        sp, plan, ev = coordinates()
        probes = pt.Coordinates(ev, sp, plan)
        sides = probes.evaluate(0, np.arange(sp.n))
    assert probes.index.tolist() == list(range(5))
    theta = plan.theta.astype(np.float64)
    for i in range(sp.n):
        up, down = theta.copy(), theta.copy()
        up[i] += sides.hp[i]
        down[i] -= sides.hm[i]
        assert sides.fp[i] == pytest.approx(host_loss(up), rel=1e-14)
        assert sides.fm[i] == pytest.approx(host_loss(down), rel=1e-14)
    assert np.all(sides.hp > 0) and np.all(sides.hm > 0)
    assert np.array_equal((theta + sides.hp) - theta, sides.hp)  # the steps are exact


def test_finer_stencils_take_smaller_steps():
    with enable_x64(True):
        sp, plan, ev = coordinates()
        hp1, _ = pt.all_steps(sp, plan, dq.SCALES[0])
        hp2, _ = pt.all_steps(sp, plan, dq.SCALES[1])
    assert np.all(hp2 > hp1)  # SCALES[1] = 2: twice the step, to the nearest exact one
    np.testing.assert_allclose(hp2 / hp1, 2.0, rtol=1e-6)


def test_exact_displacements_are_what_the_device_adds():
    x = np.array([1.0, 3.0, 1e8, np.nan], np.float32)
    steps = [np.array([1e-3, 1e-7, 1.0, 0.0])]
    (plus,), (minus,) = pt.exact_displacements(x, steps)
    assert plus.tolist()[:3] == ((x + steps[0].astype(np.float32)) - x)[:3].astype(
        np.float64).tolist()
    assert plus[1] != 1e-7  # 1e-7 is not representable next to 3.0 in float32
    assert plus[3] == 0.0 and minus[3] == 0.0  # no step: nothing moves, even at a NaN
    assert plus[2] == 0.0  # 1e8 + 1 rounds back to 1e8 in float32 (its spacing there is 8)


def test_a_non_finite_perturbed_value_is_refused_naming_the_entry():
    sp = split_checked(PARAMS)
    values = np.array([1.0, 2.0, np.inf, 4.0, 5.0, 6.0])  # f(x+h) for 3 entries, then f(x-h)
    with pytest.raises(InputError, match=r"1 of 3 entries give NaN/Inf, first at \['a'\]\[2\]"):
        pt.finite_or_refuse(sp, np.array([0, 1, 2]), values, 3)
    pt.finite_or_refuse(sp, np.array([0, 1, 2]), np.ones(6), 3)  # finite: nothing raised
