"""Which XLA compiler options a program is compiled with: light ones for small programs.

An internal performance choice, made per program from its predicted work (no environment
variable); benchmarks/cold_start.py forces it either way to measure both sides of LIGHT_WORK.
"""

from __future__ import annotations

import re

# Lighter XLA compilation for programs whose whole execution is small: on a tiny check most of
# the time is XLA's CPU backend compiling code that then runs for microseconds. Per program (no
# environment variables): optimisation level 0 without LLVM's expensive passes, and XLA's
# classic elemental emitter for fused loops instead of its newer MLIR fusion emitters. Measured
# on W1's two programs (benchmarks/cold_start.py --compile-options): compile 94 + 73 ms fully
# optimised, 86 + 74 ms with the first two options, 43 + 29 ms with all three, while the code
# runs up to ~2.5x slower. That pays only while the program's execution stays small next to the
# time saved. LIGHT_WORK is the switch point, in the work units of flatjaxpr._cost
# (multiply-adds of contractions, elements elsewhere) summed over every evaluation the program
# is expected to run; measured with benchmarks/cold_start.py --light-sweep (README, "Cold
# start"). Both emitters implement the same HLO; results may differ in the last bits of
# transcendental functions, as between any two XLA versions, which the error model's rounding
# bounds already allow for.
LIGHT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}
LIGHT_WORK = 1e9
# Operations that run much slower under LIGHT_OPTIONS than fully optimised, by the factor each
# multiplies the program's work with before it is weighed against LIGHT_WORK: run time with the
# light options over run time fully optimised, measured on 2 CPU cores in float64
# (benchmarks/cold_start.py --light-ops): a transposed convolution (lhs_dilate) 60x, a
# scatter-add 6x, a cumulative sum (reduce_window) 7x, a vmapped dynamic_slice 5x, an argsort
# 3.4x; plain and strided convolutions, dots, pools, elementwise and linear algebra 0.5x to 3x.
# Each factor is rounded up, so that the light options are taken only where even the slowed
# execution stays small: they must never cost more than they save.
LIGHT_SLOWDOWN = (
    (re.compile(r"lhs_dilate = \[(?!1(, 1)*\])"), 100.0),
    (re.compile(r"stablehlo\.scatter"), 10.0),
    (re.compile(r"stablehlo\.reduce_window"), 10.0),
    (re.compile(r"stablehlo\.dynamic_slice|stablehlo\.dynamic_update_slice"), 10.0),
    (re.compile(r"stablehlo\.sort"), 5.0),
    (re.compile(r"stablehlo\.gather"), 5.0),
)


def light(work: float | None, forced: bool | None = None) -> bool:
    """Compile with LIGHT_OPTIONS? `work`: the program's predicted total work (None: unknown,
    so fully optimised). `forced`: True or False decides it either way, for measurements
    (benchmarks/cold_start.py passes it through `programs.compiled`'s `forced_light`)."""
    if forced is not None:
        return forced
    return work is not None and work <= LIGHT_WORK


def slowdown(text: str) -> float:
    """How much slower a lowered program (its StableHLO text) may run under LIGHT_OPTIONS: the
    largest factor of LIGHT_SLOWDOWN among its operations, 1 without any."""
    return max((factor for pattern, factor in LIGHT_SLOWDOWN if pattern.search(text)),
               default=1.0)
