"""The host strategy: a function JAX cannot trace (plain NumPy forward code), evaluated in a
loop on the host, one perturbation at a time, with the same results as the traced ones.
"""

from __future__ import annotations

import jax
import numpy as np

from jgc._src.evaluators.calls import user_call
from jgc._src.evaluators.evaluator import Evaluator
from jgc._src.evaluators.layout import _copy_arrays, assemble, check_scalar, loss_value, segments_of
from jgc._src.stages.split import flat_output, tree_pformat


class HostEvaluator(Evaluator):
    """A function JAX cannot trace, evaluated one perturbation at a time on the host."""

    def __init__(self, fn, sp, theta, dtypes, args, *, vector=False, has_aux=False,
                 trace_error: str = ""):
        super().__init__(fn, sp, theta, dtypes, args, vector=vector, has_aux=has_aux)
        self.trace_error = trace_error
        self.host_dynamic = _copy_arrays(self.dynamic)

    def _host(self, t: np.ndarray, where: str = "at params"):
        params, args = assemble(self.layout, segments_of(self.layout, t), self.host_dynamic,
                                xp=np)
        what = "f(*primals)" if self.vector else "loss(params, *args)"
        out = user_call(what, self.fn, params, *args,
                        context=f"{where}, with params = {tree_pformat(params)}.\n  (JAX could "
                                f"not trace it either: {self.trace_error})")
        if self.vector:
            self.out_tree = jax.tree_util.tree_structure(out)
            arr = np.asarray(flat_output(out, np), np.float64)
            self.out_size = arr.size
            return arr
        arr = np.asarray(loss_value(out, self.has_aux))
        check_scalar(arr.shape, arr.dtype)
        self.out_dtype = arr.dtype
        return float(arr.reshape(()))

    def at(self):
        self.n_evaluations += 1
        return self._host(self.theta_np)

    def _loop(self, points, where) -> np.ndarray:
        self.n_evaluations += len(points)
        return np.array([self._host(t, w) for t, w in zip(points, where)], np.float64)

    def perturbed(self, index, step, deadline=None) -> np.ndarray:
        del deadline  # never timed: mode="auto" runs a host loop in full (no faster mode exists)
        index = np.asarray(index, np.int64)
        points, where = [], []
        for i, s in zip(index, step):
            t = self.theta_np.copy()
            t[i] += s
            points.append(t)
            where.append(f"while evaluating the perturbed point {self.sp.locate(i)} {s:+.3g}")
        return self._loop(points, where) if len(index) else np.zeros(0)

    def along(self, k, vectors, vid, mult, lo, hi) -> np.ndarray:
        start = 0 if k is None else self.sp.offsets[k]
        name = ("the parameters" if k is None
                else self.sp.checked_specs()[k].path or "<params>")
        points = []
        for v, c, a, b in zip(vid, mult, lo, hi):
            t = self.theta_np.copy()
            t[start + a:start + b] += c * vectors[v][a:b]
            points.append(t)
        return self._loop(points, [f"while evaluating a direction in {name}"] * len(points))
