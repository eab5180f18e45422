"""An opt-in persistent compilation cache, for test suites and notebooks.

Most of a small check's first call is XLA compilation (about 0.2 s per program on two CPU
cores, against milliseconds of evaluation). JAX can keep compiled programs on disk, keyed on
the program and the compiler, but by default only programs that took at least a second to
compile are written (`jax_persistent_cache_min_compile_time_secs = 1.0`), so none of jgc's
small programs would be. `enable_compilation_cache` turns JAX's cache on with thresholds at
zero, so that a test suite run twice compiles its checks once.

It changes JAX's global configuration, which is why it is opt-in and never done behind the
user's back: by calling it, by pytest's `--jgc-cache` option, or by setting JGC_COMPILATION_CACHE
(to 1 for the default directory, or to a directory) before importing jgc. As JAX's
documentation warns, the cache is trusted: do not point it at a directory others can write to.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from jgc._src.tree import InputError

ENV = "JGC_COMPILATION_CACHE"
# JGC_COMPILATION_CACHE values, case-insensitive: these turn it off (as unset does) or ask for the
# default directory; anything else is a directory.
OFF = frozenset({"", "0", "false", "off", "no"})
ON = frozenset({"1", "true", "on", "yes"})


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/jgc/xla, by default ~/.cache/jgc/xla: per user."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jgc" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Keeps every program JAX compiles (jgc's and the caller's) in a persistent cache at
    `path` (default: `default_cache_dir()`), so that a later process reuses it instead of
    compiling. Sets JAX's `jax_compilation_cache_dir` and lowers its thresholds
    (`jax_persistent_cache_min_compile_time_secs`, `jax_persistent_cache_min_entry_size_bytes`)
    to 0, so that small programs are cached too. Returns the directory. Called again with
    another directory, the cache moves there: later programs are read from and written to it.

    In a pytest suite: `pytest --jgc-cache` (jgc's pytest plugin), or one line in
    `conftest.py`: `jgc.enable_compilation_cache()`.

    Raises:
      InputError: the path is empty, or the directory cannot be created.
    """
    if path is not None and not str(path).strip():
        raise InputError("enable_compilation_cache(path=''): an empty path would cache into "
                         "whatever the current directory is. Pass a directory, or None for the "
                         f"default ({str(default_cache_dir())!r}).")
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"the compilation cache directory {str(directory)!r} cannot be created "
            f"({type(e).__name__}: {e.strerror or e}); pass enable_compilation_cache(path=...) "
            f"a writable directory, or set {ENV} to one (1: the default, "
            f"{str(default_cache_dir())!r})") from e
    current = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if current is not None and current != str(directory):
        # JAX opens its cache once, at the first compilation, and keeps writing there whatever
        # the setting says later: reset it, so that the next compilation opens the new one.
        compilation_cache.reset_cache()
    return directory


def enable_from_environment(strict: bool = False) -> Path | None:
    """JGC_COMPILATION_CACHE=1 (or true, on, yes: the default directory) or a directory enables
    the cache; unset, empty, 0, false, off or no leaves JAX's configuration alone.

    At import (strict=False) a directory that cannot be created is a warning, and jgc runs
    without the cache: importing must not fail. The command line asks again with strict=True
    and exits with a usage error instead."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    try:
        return enable_compilation_cache(None if value.lower() in ON else value)
    except InputError as e:
        if strict:
            raise InputError(f"{ENV}={value!r}: {e}") from e
        warnings.warn(f"{ENV}={value!r}: {e}. jgc runs without the compilation cache.",
                      RuntimeWarning, stacklevel=3)
        return None
