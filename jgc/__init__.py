"""jgc: is your gradient right, where is it wrong, and why.

The public API. Everything under `jgc._src` is private and may change without notice.
"""

from jgc._src.cache import enable_compilation_cache as enable_compilation_cache
from jgc._src.cache import enable_from_environment as _enable_from_environment
from jgc._src.check import assert_grad as assert_grad
from jgc._src.check import check_grad as check_grad
from jgc._src.check import numerical_grad as numerical_grad
from jgc._src.jvp import check_hvp as check_hvp
from jgc._src.jvp import check_jvp as check_jvp
from jgc._src.report import LeafReport as LeafReport
from jgc._src.report import Report as Report
from jgc._src.tree import InputError as InputError
from jgc._src.version import __version__ as __version__
from jgc._src.vjp import check_vjp as check_vjp

__all__ = (
    "InputError",
    "LeafReport",
    "Report",
    "__version__",
    "assert_grad",
    "check_grad",
    "check_hvp",
    "check_jvp",
    "check_vjp",
    "enable_compilation_cache",
    "numerical_grad",
)

_enable_from_environment()  # only when JGC_COMPILATION_CACHE asks for it
