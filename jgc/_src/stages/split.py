"""Stage `split`: which leaves of a pytree are checked, and how a gradient pytree maps onto them.

A leaf is *checked* when it is a floating-point or complex array (NumPy or JAX, any shape,
including scalars and empty arrays) or a Python float or complex. Every other leaf (ints,
bools, None, strings, the callables an Equinox module holds) is held fixed and reported as
"skipped". Paths are formatted once, with `jax.tree_util.keystr`, and that format is used
everywhere in jgc.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayTree = Any  # A pytree whose leaves are arrays (the domain type, as in chex/optax).

_is_none = lambda x: x is None  # None is an empty pytree node; jgc reports it as a skipped leaf.


class InputError(ValueError):
    """A user input that jgc cannot check, with a message that names it and suggests a fix."""


InputError.__module__ = "jgc"  # tracebacks show jgc.InputError, the public name


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One leaf of `params`: where it is, what it is, and whether it is checked."""

    path: str  # jax.tree_util.keystr of the leaf's path; "" when params is a single array.
    shape: tuple[int, ...]
    dtype: str | None  # None for non-array leaves.
    checked: bool
    reason: str = ""  # Why a leaf is skipped, e.g. "int32 array" or "str".
    # A complex leaf's view holds a value's (Re, Im) (check_jvp's outputs), not a gradient's
    # (df/dx, df/dy) = (Re g, -Im g): how its complex values are rebuilt for the report.
    plain: bool = False

    @property
    def is_complex(self) -> bool:
        return self.dtype is not None and self.dtype.startswith("complex")

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The shape of the real view the stages work on: shape + (2,) for a complex leaf
        (the real and the imaginary part of each entry), else shape."""
        return (*self.shape, 2) if self.is_complex else self.shape

    @property
    def size(self) -> int:
        """Real entries in the view: twice the entries of a complex leaf."""
        return int(np.prod(self.view_shape, dtype=np.int64))

    @property
    def n_entries(self) -> int:
        """Entries of the leaf itself (complex entries count once)."""
        return int(np.prod(self.shape, dtype=np.int64))

    def entry_name(self, j: int) -> str:
        """Real-view entry j as "[0, 2]", or "[0, 2] (imaginary part)" in a complex leaf."""
        idx = np.unravel_index(int(j), self.view_shape)
        text = f"[{', '.join(str(int(i)) for i in idx[:len(self.shape)])}]"
        if self.is_complex:
            text += " (imaginary part)" if idx[-1] else " (real part)"
        return text


@dataclasses.dataclass(frozen=True)
class Split:
    """`params` split into checked leaves (flattened into one vector) and fixed leaves."""

    treedef: Any
    specs: tuple[LeafSpec, ...]  # Every leaf, in tree order.
    leaves: tuple[Any, ...]  # The original leaves, never modified.
    checked: tuple[int, ...]  # Indices into `leaves` of the checked leaves.
    offsets: tuple[int, ...]  # Start of each checked leaf in the flat vector; len = len(checked)+1.

    @property
    def n(self) -> int:
        return self.offsets[-1]

    def checked_specs(self) -> list[LeafSpec]:
        return [self.specs[i] for i in self.checked]

    def finite(self, k: int) -> np.ndarray:
        """Which real-view entries of checked leaf k are finite: a NaN or Inf parameter the
        loss masks out cannot be moved by a step (NaN + h is NaN), so it is not checked."""
        return np.isfinite(real_view(self.leaves[self.checked[k]]).ravel())

    def complex_paths(self) -> list[str]:
        """The paths of the checked complex leaves."""
        return [s.path or "<params>" for s in self.checked_specs() if s.is_complex]

    def locate(self, flat_index: int) -> str:
        """The entry at a position of the flat vector, as "['W1'][0, 2]"."""
        k = int(np.searchsorted(self.offsets, flat_index, side="right")) - 1
        spec = self.specs[self.checked[k]]
        return f"{spec.path or '<params>'}{spec.entry_name(int(flat_index) - self.offsets[k])}"


def listing(names, limit: int) -> str:
    """Up to `limit` names, comma-separated, with ', ...' when there are more."""
    names = list(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def is_float_leaf(x) -> bool:
    """True for the leaves jgc checks: floating-point and complex arrays, Python floats and
    complex numbers."""
    if isinstance(x, (float, complex)):
        return True
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return jax.numpy.issubdtype(x.dtype, np.inexact)
    return False


def real_view(x) -> np.ndarray:
    """A leaf's values as float64 in its real view: (Re, Im) on a new last axis if complex."""
    a = np.asarray(x)
    if np.iscomplexobj(a):
        return np.stack([a.real, a.imag], axis=-1).astype(np.float64)
    return a.astype(np.float64)


def gradient_view(g: np.ndarray) -> np.ndarray:
    """A complex gradient in JAX's convention (df/dx - i df/dy) as its real view (df/dx,
    df/dy), in the gradient's own real precision (its rounding enters the error model)."""
    return np.stack([g.real, -g.imag], axis=-1)


def complex_value(view: np.ndarray) -> np.ndarray:
    """Inverse of gradient_view: (df/dx, df/dy) on the last axis -> df/dx - i df/dy."""
    return view[..., 0] - 1j * view[..., 1]


def promoted_dtype(*dtypes) -> np.dtype:
    """The dtype JAX's standard promotion gives arrays of these dtypes, for jgc's own arithmetic
    on values of the user's dtypes: cast to it explicitly, that holds under
    jax_numpy_dtype_promotion='strict' too, with the same result. An inexact dtype wins over
    integers and booleans (int64 with float32 is float32), and inexact dtypes promote as in
    NumPy, which agrees with JAX among them (float16 < float32 < float64, a float and a complex
    give a complex of the wider precision, bfloat16 with float16 gives float32)."""
    dtypes = [np.dtype(d) for d in dtypes]
    inexact = [d for d in dtypes if np.issubdtype(d, np.inexact)]
    return jax.dtypes.canonicalize_dtype(np.result_type(*(inexact or dtypes)))


def explicitly_promoted(*values) -> tuple:
    """The values, with JAX arrays of different dtypes cast to the one standard promotion
    gives them (`promoted_dtype`): an operation on them then holds under
    jax_numpy_dtype_promotion='strict' with the same result. Weakly typed values (Python
    scalars) are left as they are, since strict promotion allows them, and values that are all
    NumPy too: on the host NumPy promotes as it always does."""
    if not any(isinstance(v, jax.Array) for v in values):
        return values
    kinds = [jax.dtypes.result_type(v, return_weak_type_flag=True) for v in values]
    strong = {dtype for dtype, weak in kinds if not weak}
    if len(strong) < 2:
        return values
    dtype = promoted_dtype(*strong)
    return tuple(v if weak else jnp.asarray(v).astype(dtype) for v, (_, weak) in zip(values, kinds))


def flat_output(out, xp=jax.numpy):
    """A vector function's outputs (any pytree of arrays) as one flat real vector: a complex
    output leaf by its real view, the real and imaginary part of each element in turn (the
    order tree.LeafSpec.view_shape gives check_jvp's output leaves), in their promoted dtype."""
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves:
        return xp.zeros(0)
    return xp.concatenate(explicitly_promoted(
        *(xp.ravel(_real_view(xp, xp.asarray(o))) for o in leaves)))


def _real_view(xp, o):
    if xp.iscomplexobj(o):
        return xp.stack([xp.real(o), xp.imag(o)], axis=-1)
    return o


def merge_parts(xp, view):
    """The complex array whose real view is `view` (real and imaginary parts on the last axis),
    in NumPy or traced JAX."""
    if xp is np:
        return view[..., 0] + 1j * view[..., 1]  # NumPy 2: float32 parts give complex64
    return jax.lax.complex(view[..., 0], view[..., 1])


def _describe(x) -> tuple[tuple[int, ...], str | None, str]:
    """Shape, dtype name and a short description of any leaf."""
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return tuple(x.shape), str(x.dtype), f"{x.dtype} array"
    if isinstance(x, float):
        return (), "float64", "float"
    if isinstance(x, complex):
        return (), "complex128", "complex"
    return (), None, type(x).__name__


def flatten(tree) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves with their `keystr` paths, treating None as a leaf so it can be reported."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in pairs], treedef


def split(params: ArrayTree) -> Split:
    """Splits `params` into checked and fixed leaves (complex leaves by their real view)."""
    pairs, treedef = flatten(params)
    specs, checked, offsets = [], [], [0]
    for i, (path, leaf) in enumerate(pairs):
        shape, dtype, what = _describe(leaf)
        ok = is_float_leaf(leaf)
        specs.append(LeafSpec(path, shape, dtype, ok, "" if ok else what))
        if ok:
            checked.append(i)
            offsets.append(offsets[-1] + specs[-1].size)
    return Split(treedef, tuple(specs), tuple(leaf for _, leaf in pairs), tuple(checked),
                 tuple(offsets))


def split_checked(params: ArrayTree, name: str = "params") -> Split:
    """`split`, refusing a tree with nothing to check: no float leaves, or only empty ones (a
    check of zero entries would verify nothing)."""
    sp = split(params)
    if not sp.checked:
        found = ", ".join(f"{s.path or '<params>'}: {s.reason}" for s in sp.specs)
        raise InputError(
            f"{name} has no floating-point leaves to check"
            + (f" (its leaves: {found})" if sp.specs else " (it is empty)")
            + ". Pass the trainable parameters as float arrays, e.g. "
            "{'W': jnp.zeros((3, 4)), 'b': jnp.zeros(4)} (complex arrays are checked too).")
    if sp.n == 0:
        empty = ", ".join(f"{s.path or '<params>'} (shape {s.shape})" for s in sp.checked_specs())
        raise InputError(
            f"{name} has no entries to check: every floating-point leaf is empty ({empty}). A "
            "check of zero entries would verify nothing. Pass parameters with at least one "
            "entry.")
    return sp


def short_dtype(dtype: str | None) -> str:
    """'float32' -> 'f32', as equinox's tree_pformat prints arrays."""
    if dtype is None:
        return "?"
    table = {"float": "f", "int": "i", "uint": "u", "bool": "bool", "complex": "c", "bfloat": "bf"}
    for long, short in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if dtype.startswith(long):
            return short + dtype[len(long):]
    return dtype


def leaf_pformat(x) -> str:
    """One leaf as `f32[3,4]`; non-arrays by type name (and value, for short scalars)."""
    if x is None:
        return "None"
    shape, dtype, what = _describe(x)
    if dtype is None:
        return what
    if isinstance(x, (float, complex)):
        return type(x).__name__
    return f"{short_dtype(dtype)}[{','.join(map(str, shape))}]"


def tree_pformat(tree, max_leaves: int = 12) -> str:
    """A pytree as `{'W1': f32[3,4], 'b1': f32[4]}`: the structure with one token per leaf."""
    pairs, treedef = flatten(tree)
    tokens = [_Token(leaf_pformat(leaf)) for _, leaf in pairs]
    text = str(jax.tree_util.tree_unflatten(treedef, tokens))
    if len(pairs) > max_leaves and len(text) > 400:
        text = text[:400] + " ..."
    return text


class _Token:
    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def structure_error(what: str, params, other, first_difference: str, fix: str) -> InputError:
    """An error that shows both structures side by side and names the first difference."""
    return InputError(
        f"{what} does not match the structure of params.\n"
        f"  params: {tree_pformat(params)}\n"
        f"  {what:<6}: {tree_pformat(other)}\n"
        f"First difference: {first_difference}.\n{fix}"
    )


_GRAD_FIX = (
    "The gradient must be a pytree shaped like params (same keys and leaf shapes), as jax.grad "
    "returns, or a flat vector in ravel_pytree order."
)


def match_gradient(grad, sp: Split, params, what: str = "grad", tangent: bool = False
                   ) -> list[np.ndarray]:
    """Maps a gradient (a pytree like params, or a flat vector) onto the checked leaves.

    Returns one NumPy array per checked leaf in its real view (see the module doc), a copy in
    the gradient's own floating dtype (its precision enters the error model). A complex leaf's
    gradient is read in JAX's convention, df/dx - i df/dy; with `tangent` (a direction, not a
    gradient: check_jvp's tangents) as x + iy, unconjugated. Leaves of the gradient at skipped
    paths (None, zeros, float0, ...) are ignored. Raises InputError, naming the first
    difference, on a wrong structure, a missing or extra key, a wrong shape, or a non-numeric
    leaf.
    """
    if _is_flat_vector(grad, sp):
        return [_as_view(a, s, what, tangent) for a, s in
                zip(_split_flat(np.asarray(grad), sp, params, what), sp.checked_specs())]
    pairs, _ = flatten(grad)
    by_path = dict(pairs)
    param_paths = [s.path for s in sp.specs]
    extra = [p for p, _ in pairs if p not in set(param_paths)]
    if extra:
        raise structure_error(what, params, grad,
                              f"{what}{extra[0]} is not a leaf of params ({len(extra)} extra "
                              f"path{'s' if len(extra) > 1 else ''})", _GRAD_FIX)
    out = []
    for spec in sp.checked_specs():
        if spec.path not in by_path:
            raise structure_error(what, params, grad, f"params{spec.path} ({_spec_fmt(spec)}) "
                                  f"has no entry in {what}", _GRAD_FIX)
        leaf = by_path[spec.path]
        if leaf is None:
            raise structure_error(what, params, grad,
                                  f"{what}{spec.path} is None but params{spec.path} is a "
                                  f"checked {_spec_fmt(spec)} leaf", _GRAD_FIX)
        arr = _as_array(leaf, spec, what)
        if arr.shape != spec.shape:
            squeezed = np.empty(spec.shape).squeeze().shape
            if arr.size == spec.n_entries and arr.squeeze().shape == squeezed:
                hint = " (same entries, different shape: reshape it to the parameter's shape)"
            else:
                hint = ""
            raise structure_error(what, params, grad,
                                  f"{what}{spec.path} has shape {arr.shape} but params{spec.path} "
                                  f"has shape {spec.shape}{hint}", _GRAD_FIX)
        out.append(_as_view(arr, spec, what, tangent))
    return out


def _spec_fmt(spec: LeafSpec) -> str:
    return f"{short_dtype(spec.dtype)}[{','.join(map(str, spec.shape))}]"


def _as_array(leaf, spec: LeafSpec, what: str) -> np.ndarray:
    try:
        arr = np.array(leaf, copy=True)  # A copy: the user's arrays are never touched.
    except Exception as e:  # noqa: BLE001 - anything that is not array-like.
        raise InputError(f"{what}{spec.path} is a {type(leaf).__name__}, not an array: {e}") from e
    if arr.dtype == object or not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == bool):
        raise InputError(f"{what}{spec.path} has dtype {arr.dtype}; expected a "
                         f"{'complex' if spec.is_complex else 'floating-point'} array of shape "
                         f"{spec.shape}.")
    return arr


def _as_view(arr: np.ndarray, spec: LeafSpec, what: str, tangent: bool) -> np.ndarray:
    """One gradient leaf, already shaped like its parameter, as the real view of the stages."""
    if not spec.is_complex:
        if np.iscomplexobj(arr):
            if np.any(arr.imag):
                raise InputError(
                    f"{what}{spec.path} is complex ({arr.dtype}) but params{spec.path} is "
                    "real. " + ("Pass a real tangent for a real input." if tangent else
                                "Return the real gradient (for a real loss, its real part)."))
            arr = arr.real
        return arr if jnp.issubdtype(arr.dtype, jnp.floating) else arr.astype(np.float64)
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        arr = arr.astype(np.float64)
    # A real array for a complex parameter is read as complex with a zero imaginary part: the
    # check then says whether that part is right (a `.real` taken by mistake shows as wrong).
    z = arr if np.iscomplexobj(arr) else arr.astype(np.result_type(arr.dtype, np.complex64))
    return np.stack([z.real, z.imag], axis=-1) if tangent else gradient_view(z)


def _is_flat_vector(grad, sp: Split) -> bool:
    if not isinstance(grad, (np.ndarray, jax.Array)) or grad.ndim != 1:
        return False
    # A single 1-D parameter leaf is a pytree, not a flat vector, when params is that leaf.
    return not (len(sp.specs) == 1 and sp.specs[0].path == "")


def _split_flat(vec: np.ndarray, sp: Split, params, what: str) -> list[np.ndarray]:
    """A flat vector in ravel_pytree order: either over the checked leaves or over every array."""
    array_specs = [s for s in sp.specs if s.dtype is not None]
    n_all = sum(s.n_entries for s in array_specs)
    n_checked = sum(s.n_entries for s in sp.checked_specs())
    if vec.size == n_checked:
        layout = sp.checked_specs()
    elif vec.size == n_all:
        layout = array_specs
    else:
        raise InputError(
            f"{what} is a flat vector of length {vec.size}, but params has {n_checked} checked "
            f"(floating-point) entries and {n_all} entries in ravel_pytree order.\n"
            f"  params: {tree_pformat(params)}\n{_GRAD_FIX}")
    if not jnp.issubdtype(vec.dtype, jnp.inexact):
        vec = vec.astype(np.float64)
    out, start = {}, 0
    for spec in layout:
        out[spec.path] = vec[start:start + spec.n_entries].reshape(spec.shape).copy()
        start += spec.n_entries
    return [out[s.path] for s in sp.checked_specs()]
