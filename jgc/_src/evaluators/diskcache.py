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

JAX is imported only when the cache is enabled: `import jgc`, which pytest does at start-up for
jgc's plugin in every project where jgc is installed, stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

ENV = "JGC_COMPILATION_CACHE"
# JGC_COMPILATION_CACHE values, case-insensitive: these turn it off (as unset does) or ask for the
# default directory; anything else is a directory.
OFF = frozenset({"", "0", "false", "off", "no"})
ON = frozenset({"1", "true", "on", "yes"})
# What enable_compilation_cache sets, and compilation_cache restores.
_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


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

    In a pytest suite, `pytest --jgc-cache` (jgc's plugin) does it for the session.

    Raises:
      InputError: the path is empty, or the directory cannot be created.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from jgc._src.stages.split import InputError

    if path is not None and not str(path).strip():
        raise InputError("enable_compilation_cache(path=''): an empty path would cache into "
                         "whatever the current directory is. Pass a directory, or None for the "
                         f"default ({str(default_cache_dir())!r}).")
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from jgc._src.stages.split import InputError

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
        jax_cache.reset_cache()
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
    from jgc._src.stages.split import InputError  # only now: `import jgc` does not import JAX

    try:
        return enable_compilation_cache(None if value.lower() in ON else value)
    except InputError as e:
        if strict:
            raise InputError(f"{ENV}={value!r}: {e}") from e
        warnings.warn(f"{ENV}={value!r}: {e}. jgc runs without the compilation cache.",
                      RuntimeWarning, stacklevel=3)
        return None


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike | None = None) -> Iterator[Path]:
    """`enable_compilation_cache` for the length of a block (jgc's pytest plugin: a session),
    with every entry published atomically (`atomic_entries`). Yields the directory.

    Afterwards JAX's previous settings are back, and JAX's cache object is reset so that they
    take effect: JAX opens its cache once per process, at the first compilation, and would
    otherwise keep the block's directory (or, on entry, one it opened before the block).

    Raises:
      InputError: when the directory cannot be created; nothing is changed then.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    saved = {name: jax.config.values[name] for name in _SETTINGS}
    directory = enable_compilation_cache(path)
    jax_cache.reset_cache()
    try:
        with atomic_entries():
            yield directory
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()


# Several processes sharing one cache directory (pytest -n, two suites on one machine): what JAX
# 0.10.2 guarantees, read in its source (jax/_src/lru_cache.py: LRUCache.get and .put;
# jax/_src/compiler.py: _cache_read). With the default jax_compilation_cache_max_size=-1 there is
# no lock, and put() writes an entry in place (Path.write_bytes: open with truncation, then
# write) once it finds none. A process reading that key meanwhile gets a truncated entry: JAX
# fails to decompress it, warns "Error reading persistent compilation cache entry" and compiles
# again, and a suite run with warnings as errors fails there. Measured here with JAX's LRUCache:
# a reader polling get() while another process put 200 entries of 4 MB read 16338 truncated
# ones. Two writers of one key race the same way (their bytes are identical only when the
# compiled program and its recorded compile time are). JAX locks (with the filelock package)
# only under a size cap, at the price of a directory scan per write, and a cache filled without
# the cap then fails every write (jax-ml/jax#39880: missing -atime files). So jgc publishes each
# entry atomically: JAX's put() writes it into a private staging directory inside the cache, and
# os.replace moves it into place, so a reader sees no entry or a complete one. The cache stays
# one shared directory; staging lasts one write.
@contextlib.contextmanager
def atomic_entries() -> Iterator[None]:
    """While active, JAX's file cache publishes every new entry atomically (the comment above);
    a JAX without `jax._src.lru_cache.LRUCache` is left as it is."""
    try:
        from jax._src.lru_cache import LRUCache
    except ImportError:
        yield
        return
    put = LRUCache.put
    LRUCache.put = _staged(put)
    try:
        yield
    finally:
        LRUCache.put = put


def _staged(put):
    """LRUCache.put, writing into a staging directory and moving the files into the cache."""

    @functools.wraps(put)
    def staged_put(self, key: str, value: bytes) -> None:
        if getattr(self, "eviction_enabled", True) or "://" in str(self.path):
            return put(self, key, value)  # a size cap (JAX locks) or a remote file system
        staging = Path(tempfile.mkdtemp(prefix=".jgc-staging-", dir=str(self.path)))
        try:
            staged = copy.copy(self)
            staged.path = self.path / staging.name
            put(staged, key, value)
            for entry in staging.iterdir():
                os.replace(entry, Path(str(self.path)) / entry.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return staged_put
