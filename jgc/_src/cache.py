"""An opt-in persistent compilation cache, for test suites and notebooks.

Most of a small check's first call is XLA compilation (about 0.2 s per program on two CPU
cores, against milliseconds of evaluation). JAX can keep compiled programs on disk, keyed on
the program and the compiler, but by default only programs that took at least a second to
compile are written (`jax_persistent_cache_min_compile_time_secs = 1.0`), so none of jgc's
small programs would be. `enable_compilation_cache` turns JAX's cache on with thresholds at
zero, so that a test suite run twice compiles its checks once.

It changes JAX's global configuration, which is why it is opt-in and never done behind the
user's back: by calling it, or by setting JGC_COMPILATION_CACHE (to 1 for the default directory,
or to a directory) before importing jgc. As JAX's documentation warns, the cache is trusted: do
not point it at a directory others can write to.

JAX is imported only when the cache is enabled: `import jgc`, which pytest does at start-up for
jgc's plugin in every project where jgc is installed, stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JGC_COMPILATION_CACHE"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/jgc/xla, by default ~/.cache/jgc/xla: per user."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jgc" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Keeps every program JAX compiles (jgc's and the caller's) in a persistent cache at
    `path` (default: `default_cache_dir()`), so that a later process reuses it instead of
    compiling. Sets JAX's `jax_compilation_cache_dir` and lowers its thresholds
    (`jax_persistent_cache_min_compile_time_secs`, `jax_persistent_cache_min_entry_size_bytes`)
    to 0, so that small programs are cached too. Returns the directory.

    In a pytest suite, one line in `conftest.py`: `jgc.enable_compilation_cache()`.
    """
    import jax

    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from jgc._src.tree import InputError

        raise InputError(
            f"the compilation cache directory {str(directory)!r} cannot be created "
            f"({type(e).__name__}: {e.strerror or e}); pass enable_compilation_cache(path=...) "
            f"a writable directory, or set {ENV} to one (1: the default, "
            f"{str(default_cache_dir())!r})") from e
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def enable_from_environment() -> Path | None:
    """At import: JGC_COMPILATION_CACHE=1 (the default directory) or a directory enables the
    cache; unset, empty or 0 leaves JAX's configuration alone."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "0"):
        return None
    return enable_compilation_cache(None if value == "1" else value)
