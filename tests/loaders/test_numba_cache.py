"""numba's on-disk cache of a kernel that inlines loaders.pixels.pixel_kernels goes stale with them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

nb = pytest.importorskip("numba")
px = pytest.importorskip("cornpipe.loaders.pixels.pixel_kernels")


def _fresh_dispatcher(module_file: Path, helpers: Path):
    """A new dispatcher (cache=True) over the module's `kernel`, kept fresh against `helpers`."""
    spec = importlib.util.spec_from_file_location(f"cached_kernel_{id(object())}", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return px.fresh_cache(nb.njit(cache=True)(module.kernel), str(helpers))


def test_a_cached_kernel_is_compiled_anew_when_the_file_it_inlines_changes(tmp_path: Path):
    module_file, helpers = tmp_path / "kernel_mod.py", tmp_path / "helpers.py"
    module_file.write_text("def kernel(x):\n    return x + 1\n")
    helpers.write_text("SCALE = 1\n")

    first = _fresh_dispatcher(module_file, helpers)
    assert first(1) == 2
    assert first.stats.cache_misses and not first.stats.cache_hits  # compiled and saved

    again = _fresh_dispatcher(module_file, helpers)
    assert again(1) == 2
    assert again.stats.cache_hits and not again.stats.cache_misses  # the helpers did not change: loaded

    helpers.write_text("SCALE = 2\n")
    px._source_digest.cache_clear()  # (a new process reads the file anew)
    changed = _fresh_dispatcher(module_file, helpers)
    assert changed(1) == 2
    assert changed.stats.cache_misses and not changed.stats.cache_hits  # compiled anew, not the stale code


def test_an_uncached_kernel_is_left_alone():
    kernel = nb.njit(lambda x: x + 1)
    assert px.fresh_cache(kernel) is kernel and kernel(1) == 2
