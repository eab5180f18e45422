"""The memory budget that sizes each chunk of perturbations, and the sizes in its messages.
"""

from __future__ import annotations

import os

import numpy as np

from jgc._src.evaluators import programs


def nbytes(n: float) -> str:
    """A size for messages: '512 bytes', '3.5 KiB', '240 MiB', '1.5 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} byte{'s' if int(n) != 1 else ''}"


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 1 GiB: room for the batch of
    perturbed evaluations without crowding the user's own arrays."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 2**30
    return int(min(max(available // 4, 256 * 2**20), 2**30))


def agreed_budget(budget: int) -> int:
    """The memory budget every process uses: under jax.distributed the smallest of theirs
    (memory is per process), so that all choose the same chunks and run the same programs; a
    different chunk on one process would leave the others waiting at a collective."""
    return int(programs.process_min(budget))


def activation_bytes(jaxpr) -> int:
    """An upper bound on the memory one evaluation of the loss touches: the sum of every
    intermediate value's size in its jaxpr (XLA fuses and frees most of them)."""
    total = 0
    stack = [jaxpr]
    while stack:
        jp = stack.pop()
        for eqn in jp.eqns:
            for v in eqn.outvars:
                aval = v.aval
                if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    total += int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize
            for param in eqn.params.values():  # inner jaxprs: pjit, scan, cond, custom rules
                for item in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        stack.append(inner)
    return total


# The structured evaluator's chunks: its perturbations are cheap, so larger chunks amortise each
# call.
MAX_CHUNK_STRUCTURED = 256


def structured_chunk(per_bytes: int, budget: int) -> int:
    """Perturbations per structured call: within the budget, at most MAX_CHUNK_STRUCTURED, and
    the same for every call of a leaf however many perturbations it has, so that the noise
    probes, every stencil and the refinements of one check share one compiled program per leaf.
    Padding a small call to the full chunk costs less than compiling another: a structured
    perturbation costs at most half a forward pass (on W2, 256 of them take 0.1 to 1 ms; a
    compile, 50 to 150 ms)."""
    return max(1, min(MAX_CHUNK_STRUCTURED, budget // max(per_bytes, 1)))
