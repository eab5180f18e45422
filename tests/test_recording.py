"""The recorder under jgc's pytest plugin: every public check is recorded once, by name, with
its Report (or its error), only while a listener is active."""

import contextvars

import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.surfaces import recording


def test_every_surface_is_recorded_once_by_name_with_its_report():
    f = lambda x: jnp.sin(x)
    x = np.linspace(0.1, 1.0, 3)
    outside = recording._LISTENER.get()  # jgc's pytest plugin listens to every test
    with recording.listening() as recorder:
        jgc.check_grad(lambda p: jnp.sum(f(p) ** 2), x)
        jgc.assert_grad(lambda p: jnp.sum(f(p) ** 2), x)  # calls check_grad: one record
        jgc.check_vjp(f, lambda dy, x: (dy * jnp.cos(x),), (x,))
        jgc.check_jvp(f, None, (x,))
        jgc.check_hvp(lambda p: jnp.sum(f(p)), x)
    records = recorder.records
    assert [r.surface for r in records] == ["check_grad", "check_grad", "check_vjp",
                                            "check_jvp", "check_hvp"]
    assert all(isinstance(r.report, jgc.Report) and r.report.ok for r in records)
    assert all(r.seconds > 0 and r.error is None for r in records)
    assert recording._LISTENER.get() is outside  # the block's listener is gone after it


def test_a_failing_assert_grad_leaves_its_failing_report():
    with recording.listening() as recorder, pytest.raises(AssertionError, match=r"\[jgc\]"):
        jgc.assert_grad(lambda p: jnp.sum(p ** 2), np.ones(3), grad=lambda p: 3 * p)
    (record,) = recorder.records
    assert record.surface == "check_grad" and record.report.verdict == "wrong_gradient"


def test_a_check_that_raises_is_recorded_with_its_time_and_error():
    with recording.listening() as recorder, pytest.raises(jgc.InputError):
        jgc.check_grad(lambda p: jnp.sum(p), np.ones(2), mode="nonsense")
    (record,) = recorder.records
    assert (record.surface, record.report, record.error) == ("check_grad", None, "InputError")
    assert record.seconds > 0


def test_a_check_inside_a_recorded_call_is_part_of_it():
    @recording.recorded
    def my_suite():
        return jgc.check_grad(lambda p: jnp.sum(p ** 2), np.ones(2))

    with recording.listening() as outer:
        with recording.listening() as inner:
            my_suite()
        jgc.check_grad(lambda p: jnp.sum(p ** 2), np.ones(2))
    assert [r.surface for r in inner.records] == ["my_suite"]
    assert [r.surface for r in outer.records] == ["check_grad"]


def test_without_a_listener_nothing_is_recorded():
    with recording.listening() as recorder:
        check = lambda: jgc.check_grad(lambda p: jnp.sum(p ** 2), np.ones(2))
        assert contextvars.Context().run(check).ok  # a context where nothing listens
        assert recorder.records == ()
        check()
        assert len(recorder.take()) == 1 and recorder.records == ()
