"""The `Evaluator` interface: a function at the unperturbed and perturbed points (stage `evaluate`).

`make_evaluator` (factory.py) returns one of three strategies:

* `DenseEvaluator` (dense.py): the function is traced once per check (see programs.py) into a jaxpr
  whose inputs are one flat segment per checked leaf (in its evaluation dtype) followed by the
  array leaves that are held fixed (the rest of params, and args). Every program of the check
  evaluates that one trace, so every evaluation sees the same function: the loss as it is at call
  time. The checked leaves also live in one flat vector theta; a perturbation is a pair (flat
  index i, exact step s), and the function at theta + s e_i is computed for a chunk of
  perturbations at once by one compiled `vmap`. The perturbation is built by adding a masked step
  (`where(arange == i, s, 0)`), not with `theta.at[i].add(s)`: under vmap the latter lowers to a
  scatter, which XLA runs several times slower on CPU. Every chunk has the same size (the last one
  is padded), so a check compiles few programs, and a second check of an unchanged loss with the
  same shapes compiles nothing. A function JAX can trace but not vmap (a `jax.pure_callback`
  without a vmap method) is evaluated one perturbation at a time inside the compiled program.
* `StructuredEvaluator` (a loss with at least STRUCTURED_MIN parameters; the default there, off with
  the option evaluator="dense"): the dense evaluator, except that one-entry
  perturbations of a leaf go through the structured pass (structured/) over the same trace, which
  recomputes only what each perturbation changes (a column of a layer's output, one output channel
  of a convolution, a rank-1 update of the next layer), wherever its planned work is at most half
  the dense pass's. Directions in such a leaf (whole-leaf perturbations: directional mode and its
  group testing) start from the same pass's leaf-independent base values and run every equation
  that depends on the leaf densely, so the layers upstream of it are computed once per check. Its
  values agree with the dense evaluator's to rounding; the complex step and vector functions stay
  dense. The report's notes say which leaves took which path.
* `HostEvaluator` (host.py): a function JAX cannot trace (plain NumPy forward code), evaluated in a
  loop on the host, with the same results, more slowly.

The function is a loss (output "scalar") or any function of the parameters returning arrays
(output "vector": check_jvp's f, check_hvp's gradient), whose outputs are flattened into one
vector per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jgc._src.evaluators.layout import _copy_arrays, assemble, make_layout, segments_of
from jgc._src.stages.split import Split

# -- the strategies -------------------------------------------------------------------------

class Evaluator:
    """The interface of every strategy: the function at theta and at perturbations of it.

    Attributes:
      traceable: whether JAX could trace the function (DenseEvaluator) or not (HostEvaluator).
      n_evaluations: evaluations so far (padding excluded).
      out_dtype: the function's output dtype. out_size: outputs per evaluation (1 for a loss).
      trace_error: why JAX could not trace it, when it could not.
      batch_error: why JAX could not vmap it, when it could not.
    """

    traceable: bool = False
    batch_error: str | None = None
    trace_error: str | None = None

    def __init__(self, fn: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple, *,
                 vector: bool = False, has_aux: bool = False):
        self.fn, self.sp, self.args, self.has_aux, self.vector = fn, sp, args, has_aux, vector
        self.layout, self.dynamic = make_layout(sp, dtypes, args)
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        # One dtype for the flat vector: every leaf's values and steps are exact in it.
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        self.theta_np = theta.astype(self.dtype)
        self.segments = tuple((a, b, str(dt)) for (_, a, b, *_), dt in
                              zip(self.layout.checked, self.dtypes))
        self.n_evaluations = 0
        self.out_dtype = np.dtype(np.float64)
        self.out_size = 1
        self.out_tree = None

    def leaf_size(self, k: int) -> int:
        return self.sp.offsets[k + 1] - self.sp.offsets[k]

    def host_inputs(self):
        """(params, args) at theta as NumPy copies: a host call cannot mutate the user's arrays
        nor the check's own."""
        params, args = assemble(self.layout, segments_of(self.layout, self.theta_np.copy()),
                                _copy_arrays(self.dynamic), xp=np)
        return params, _copy_arrays(args)

    def at(self):
        """The function at the unperturbed point: a float (a loss) or a flat vector."""
        raise NotImplementedError

    def perturbed(self, index: np.ndarray, step: np.ndarray, deadline=None) -> np.ndarray:
        """The function at theta + step[j] * e_{index[j]}, for each j: values (m,) for a loss,
        (m, out_size) for a vector function, in float64."""
        raise NotImplementedError

    def strategy_note(self) -> str:
        """How the perturbations were evaluated, when the report should say so."""
        return ""

    def vectors(self, vectors: np.ndarray):
        """Step vectors for `along`, placed where `along` evaluates (the device(s))."""
        return np.asarray(vectors, self.dtype)

    def along(self, k: int | None, vectors, vid, mult, lo, hi) -> np.ndarray:
        """The function with checked leaf k (None: the whole flat vector) at
        x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1."""
        raise NotImplementedError
