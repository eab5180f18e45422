"""Names and source lines of the equations localisation reports.

A primitive is named by its primitive name (`rem`, `sin`); a custom rule by the Python
function of its rule (the custom_jvp's jvp, the custom_vjp's fwd and bwd) and of its primal.
Where an equation was written comes from the jaxpr's source information: the innermost frame of
the user's code, or, where the equation comes from a library built on jax (jax.nn, jax.numpy,
jax.scipy), the innermost frame of that library's definition rather than of jax's machinery
(tracing, dispatch, the lax wrappers). A rule's own definition line comes from the debug
information jax attaches to the rule's function.

Everything read here is jax's internal, version-dependent structure: each read is guarded, and
what cannot be read is left out (None), never an error.
"""

from __future__ import annotations

import dataclasses
import os
import re

# jax's machinery: the frames skipped when looking for where an equation was written.
_MACHINERY = ("/jax/_src/interpreters/", "/jax/_src/core.py", "/jax/_src/pjit.py",
              "/jax/_src/custom_derivatives.py", "/jax/_src/traceback_util.py",
              "/jax/_src/linear_util.py", "/jax/_src/api.py", "/jax/_src/api_util.py",
              "/jax/_src/source_info_util.py", "/jax/_src/lax/lax.py",
              "/jax/_src/numpy/util.py", "/jax/_src/tree_util.py", "/jax/_src/dispatch.py",
              "/jax/_src/lax/control_flow/", "/jax/_src/numpy/ufunc_api.py",
              "/jax/_src/numpy/array_methods.py", "/jax/_src/profiler.py",
              "/jax/_src/util.py", "/jax/_src/checkify.py")
_JAX = ("/jax/", "/jaxlib/")
_OURS = ("/jgc/_src/",)
_RULE_KINDS = {"custom_jvp jvp": "jvp", "custom_vjp fwd": "fwd", "custom_vjp bwd": "bwd"}
_SRC_INFO = re.compile(r"^(?P<name>.*?) at (?P<file>.+):(?P<line>\d+)$")


@dataclasses.dataclass(frozen=True)
class Place:
    """A function's name and where it is: `name` at `file`:`line` (any may be None)."""

    name: str | None
    file: str | None
    line: int | None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "an unknown place"
        return f"{self.name or '?'} at {where}"


def _frames(eqn) -> list[tuple[str, int, str]]:
    """(file, line, function) of the frames that wrote `eqn`, innermost first."""
    try:
        tb = eqn.source_info.traceback
        if tb is None:
            return []
        from jax._src import source_info_util as siu  # guarded: private, version-dependent

        codes, lasti = tb.raw_frames()
        out = []
        for code, i in zip(codes, lasti):
            frame = siu.raw_frame_to_frame(code, i)
            out.append((frame.file_name, int(frame.start_line), code.co_name))
        return out
    except Exception:  # noqa: BLE001 - no source information in this jax
        return []


def call_site(eqn, callers=()) -> Place:
    """Where `eqn` was written: the user's innermost frame, else a library's definition. An
    equation inside a call that jax's own code traced (jnp.where is a jit of its own) has no
    such frame: then the enclosing equations' (`callers`, innermost first) are looked at."""
    frames = [(f.replace("\\", "/"), line, fn) for e in (eqn, *callers)
              for f, line, fn in _frames(e)]
    for pick in (lambda f: not any(p in f for p in (*_JAX, *_OURS)),
                 lambda f: "/jax/_src/" in f and not any(p in f for p in _MACHINERY)):
        for file, line, fn in frames:
            if pick(file) and not _stdlib(file):
                return Place(fn, file, line)
    return Place(None, None, None)


def user_stack(eqn, callers=(), depth: int = 4) -> tuple[Place, ...]:
    """The user's frames that led to `eqn`, innermost first (up to `depth`): the call chain
    from the equation's line out to the loss."""
    out: list[Place] = []
    for e in (eqn, *callers):
        for file, line, fn in _frames(e):
            file = file.replace("\\", "/")
            if any(p in file for p in _OURS):  # jgc traced the loss here: the rest called jgc
                break  # (jax 0.7 keeps those outer frames; jax 0.10 cuts them at the trace)
            place = Place(fn, file, line)
            if any(p in file for p in _JAX) or _stdlib(file) or place in out:
                continue
            out.append(place)
    return tuple(out[:depth])


def library_site(eqn, callers=()) -> Place | None:
    """The innermost frame of a library built on jax that wrote `eqn` (jax.nn.logsumexp's
    line in jax/_src/ops/special.py), or None when the equation is the user's own."""
    for e in (eqn, *callers):
        for file, line, fn in _frames(e):
            file = file.replace("\\", "/")
            if not any(p in file for p in (*_JAX, *_OURS)):
                return None  # the user's own code comes first
            if "/jax/_src/" in file and not any(p in file for p in _MACHINERY):
                return Place(fn, file, line)
    return None


def _stdlib(file: str) -> bool:
    return file.startswith("<frozen") or "/lib/python3" in file and "site-packages" not in file


def _parse(debug_info) -> Place | None:
    text = getattr(debug_info, "func_src_info", None)
    match = _SRC_INFO.match(text or "")
    if match is None:
        return None if not text else Place(text.split(" at ")[0], None, None)
    return Place(match["name"], match["file"], int(match["line"]))


def rule_places(eqn) -> dict[str, Place]:
    """The rule functions of a custom_jvp/custom_vjp equation, by kind ("jvp", "fwd", "bwd"),
    and its primal ("primal"), as their debug information names and places them."""
    out: dict[str, Place] = {}
    for value in eqn.params.values():
        info = getattr(value, "debug_info", None)
        kind = _RULE_KINDS.get(getattr(info, "traced_for", None))
        if kind is None:
            inner = getattr(getattr(value, "jaxpr", None), "debug_info", None)
            if getattr(inner, "traced_for", "") in ("custom_jvp fun", "custom_vjp fun"):
                kind, info = "primal", inner
        place = _parse(info) if kind else None
        if place is not None:
            out[kind] = place
    if "primal" not in out and eqn.params.get("name"):
        out["primal"] = Place(str(eqn.params["name"]), None, None)
    return out


def arg_names(eqn) -> tuple[str, ...] | None:
    """The primal's argument names of a custom rule's equation, where jax recorded them."""
    try:
        names = eqn.params["call_jaxpr"].jaxpr.debug_info.arg_names
    except Exception:  # noqa: BLE001 - not recorded by this jax
        return None
    if names is None or len(names) != len(eqn.invars):
        return None
    return tuple(names)


def short_file(file: str | None) -> str | None:
    """A path as the report prints it: relative to the working directory, or from the package
    directory for an installed library (jax/_src/nn/functions.py)."""
    if file is None:
        return None
    file = file.replace("\\", "/")
    if "/site-packages/" in file:
        return file.split("/site-packages/", 1)[1]
    try:
        rel = os.path.relpath(file)
    except ValueError:
        return file
    return file if rel.startswith("..") else rel
