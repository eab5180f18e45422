"""Localisation: from "jax.grad is wrong" to the equation, the rule and the line.

equations.py records the program equation by equation; local.py checks one equation's
derivative against finite differences of its own output (estimate.derivative: jgc's one
stencil schedule and error model); source.py names it and finds its line; findings.py words
what was found; boundary.py explains what no single rule does; audit.py runs it over a program
(check_grad's hook `attach`, and `check_rules`).

What check_grad's report says when it finds jax.grad wrong, in this order:
  1. wrong derivative rule: the first equation whose local check disagrees (custom rules are
     checked first, then primitives, each in program order), with its rule function and
     definition line, its call site and the user's call stack, the input, both derivatives
     and the pattern;
  2. a piecewise definition at its boundary: a comparison on the parameters that flips within
     the step and decides a select or cond (where(x == 0, 0, x log y) at x = 0; logsumexp
     with a zero weight);
  3. a NaN made in a value the program discards (the where-NaN trap; spence on (1, 2));
  4. an equation that could not be judged (sqrt at 0 under a norm; a rule closing over a
     traced array), named but not blamed;
  5. "no single equation disagrees", or why localisation could not run. It never raises.

Limits: equations on complex values are not checked locally; loops beyond MAX_ITERATIONS
iterations in all are checked as one equation; a custom_vjp is also checked with its
cotangent scaled by 2**10 and 2**-10 (a rule nonlinear in its cotangent, as clip_gradient).
"""
