"""Localisation: from "jax.grad is wrong" to the equation, the rule and the line (issue 23).

equations.py records the program equation by equation; local.py checks one equation's
derivative against finite differences of its own output; source.py names it and finds its
line; findings.py words what was found; audit.py runs it over a program (check_grad's hook,
`check_rules`).
"""
