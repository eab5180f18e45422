"""leafplan.py: the host-side arithmetic of a leaf's plan."""

from __future__ import annotations

import numpy as np
import pytest
from jax import lax

from jgc._src.compat import enable_x64
from jgc._src.evaluators.structured.leafplan import _dot_general


@pytest.mark.parametrize("shapes, dimension_numbers", [
    (((3, 4), (4, 5)), (((1,), (0,)), ((), ()))),
    (((2, 3, 4), (2, 4, 6)), (((2,), (1,)), ((0,), (0,)))),
    (((5, 3, 4), (4, 7, 3)), (((1, 2), (2, 0)), ((), ()))),
    (((2, 3, 4), (4, 2)), (((2,), (0,)), ((0,), (1,)))),
])
def test_cancellation_contracts_on_the_host_as_lax_does(shapes, dimension_numbers):
    """The cancellation test's |a|.|b| contraction, in NumPy: lax.dot_general's result."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=s) for s in shapes)
    with enable_x64(True):
        want = np.asarray(lax.dot_general(a, b, dimension_numbers))
    np.testing.assert_allclose(_dot_general(a, b, dimension_numbers), want, rtol=1e-12)


@pytest.mark.parametrize("low, high, text", [
    (1.3, 40101.0, "1.3x to 40101x"),  # a scan's recurrent weight: not "1x"
    (5.2, 5.24, "5.2x"),
    (536.0, 784.0, "536x to 784x"),
    (12.4, 12.2, "12x"),
])
def test_the_plan_note_words_its_factors(low, high, text):
    from jgc._src.evaluators.structured.leafplan import _factor

    assert _factor(low, high) == text
