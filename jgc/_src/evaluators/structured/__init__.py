"""The structured pass: the loss at one-entry perturbations of one leaf, computing only what each
perturbation changes.

Perturbing W1[i, j] in `Z = X @ W1 + b1` changes Z only in column j, by h·X[:, i]: the perturbed
loss needs B numbers for that layer instead of B·D·H, and everything that does not depend on W1
is computed once. This package carries a chunk of C one-entry perturbations of a leaf through the
loss's jaxpr in that form:

* The jaxpr is flattened (`flatjaxpr.flatten`): nested `jit` calls and the primal computations of
  `custom_jvp`/`custom_vjp` functions are inlined (their forward values are the function's).
* The unperturbed value of every variable comes from one forward pass (`flatjaxpr.base_values`),
  run once per check and shared by every chunk of every leaf.
* A perturbed variable is a `slab.Slab`: its base value, some *fixed* axes whose coordinates differ
  per perturbation (`idx`, shape (C, n_fixed)), and the perturbed values on that hyperplane
  (`val`, shape (C, *other axes)); everywhere else it equals its base. The leaf itself is a slab
  with every axis fixed (a one-hot); a slab with no fixed axis is the dense (C, *shape) value.
* Each equation on a perturbed input has a rule (`rules.RULES`) that keeps the slab as narrow as the
  algebra allows: elementwise operations with unperturbed operands and structural operations
  keep it; a reduction or contraction over a fixed axis adds the change (val - base) to the
  output's base, which is linearity of the primitive in that operand, never jvp or grad, so the
  values stay independent of autodiff; `dot_general` with a fixed contracting axis gathers one
  slice of the other operand (a rank-1 update), and `conv_general_dilated` with a perturbed
  kernel entry convolves one input channel into one output channel; a max over a fixed axis
  takes the base's largest (or second largest) value over the other coordinates. `lax.scan`
  runs once per chunk with a base and a perturbed carry, the body's equations under the same
  rules (`loops.scan`). Anything else is made dense and evaluated under vmap, as the dense
  evaluator would (`rules._dense`).

Values agree with the dense evaluator to rounding (they are tested against it on every rule and
on the benchmark models), and the noise probes go through the same path, so the error model
measures the noise of what is evaluated. `leafplan.plan_leaf` decides per leaf whether the
structured pass is cheaper than the dense one, from the work each rule does per perturbation.

The modules: flatjaxpr.py (flattening, base values, cost), slab.py (the representation),
rules.py (one rule per primitive), loops.py (scan, and the rules a loop body needs: a
contraction of two perturbed operands, split; its `apply` is the one every equation goes
through), leafplan.py (one leaf's program and plan), evaluator.py (the
`StructuredEvaluator` that runs them, a `DenseEvaluator` otherwise). This __init__ imports none
of them.
"""
