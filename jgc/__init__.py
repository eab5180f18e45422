"""jgc: is your gradient right, where is it wrong, and why.

The public API. Everything under `jgc._src` is private and may change without notice.

The checks are imported on first use (PEP 562), so that `import jgc` does not import JAX: pytest
imports jgc's plugin at start-up in every project where jgc is installed, whether or not its
tests use jgc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jgc._src.evaluators.diskcache import enable_compilation_cache as enable_compilation_cache
from jgc._src.evaluators.diskcache import enable_from_environment as _enable_from_environment
from jgc._src.version import __version__ as __version__

if TYPE_CHECKING:  # the names _LAZY imports on first use, for type checkers and editors
    from jgc._src.localize.audit import RulesReport as RulesReport
    from jgc._src.localize.audit import check_rules as check_rules
    from jgc._src.localize.findings import RuleFinding as RuleFinding
    from jgc._src.report.report import LeafReport as LeafReport
    from jgc._src.report.report import Report as Report
    from jgc._src.stages.split import InputError as InputError
    from jgc._src.surfaces.check import assert_grad as assert_grad
    from jgc._src.surfaces.check import check_grad as check_grad
    from jgc._src.surfaces.check import numerical_grad as numerical_grad
    from jgc._src.surfaces.jvp import check_hvp as check_hvp
    from jgc._src.surfaces.jvp import check_jvp as check_jvp
    from jgc._src.surfaces.vjp import check_vjp as check_vjp

_LAZY = {  # public name -> the private module that defines it
    "InputError": "jgc._src.stages.split",
    "LeafReport": "jgc._src.report.report",
    "Report": "jgc._src.report.report",
    "assert_grad": "jgc._src.surfaces.check",
    "check_grad": "jgc._src.surfaces.check",
    "check_hvp": "jgc._src.surfaces.jvp",
    "check_jvp": "jgc._src.surfaces.jvp",
    "check_rules": "jgc._src.localize.audit",
    "RuleFinding": "jgc._src.localize.findings",
    "RulesReport": "jgc._src.localize.audit",
    "check_vjp": "jgc._src.surfaces.vjp",
    "numerical_grad": "jgc._src.surfaces.check",
}

__all__ = (
    "InputError",
    "LeafReport",
    "Report",
    "RuleFinding",
    "RulesReport",
    "__version__",
    "assert_grad",
    "check_grad",
    "check_hvp",
    "check_jvp",
    "check_rules",
    "check_vjp",
    "enable_compilation_cache",
    "numerical_grad",
)


def __getattr__(name: str):
    """A public name, from its module (imported on first use). It is looked up there each time
    rather than kept here, so that jgc never hands out a class of a module that was since
    re-imported (pytester's in-process runs do that), which `except jgc.InputError` would miss."""
    if name not in _LAZY:
        raise AttributeError(f"module 'jgc' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_enable_from_environment()  # only when JGC_COMPILATION_CACHE asks for it
