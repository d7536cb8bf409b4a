"""Shared fixtures: small random model folders on disk, and the merge helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helpers (the model zoo, the numpy references, the case tables) are the package
# ``support/`` beside this file; make it importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).parent))

from support import models


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Session-wide cache of llama-like models: ``zoo(dtype, seed, shards=1)``.

    Models are read-only inputs, so tests share them; each (dtype, seed, shards) is written
    once. The same seed gives the same values in every dtype (before rounding).
    """
    root = tmp_path_factory.mktemp("zoo")
    cache: dict = {}

    def get(dtype: str = "bf16", seed: int = 0, shards: int = 1) -> models.Model:
        key = (models.SHORT[dtype], seed, shards)
        if key not in cache:
            name = f"{key[0].lower()}-s{seed}-k{shards}"
            cache[key] = models.make_llama(root / name, dtype=dtype, seed=seed, shards=shards)
        return cache[key]

    return get


@pytest.fixture
def make_model(tmp_path):
    """Write a fresh llama-like model under this test's tmp_path (safe to modify)."""

    def make(name: str, dtype: str = "bf16", seed: int = 0, shards: int = 1, **kw):
        return models.make_llama(tmp_path / name, dtype=dtype, seed=seed, shards=shards, **kw)

    return make


@pytest.fixture
def out_dir(tmp_path):
    """Where a merge writes: alone in its parent, so leftovers are easy to spot."""
    parent = tmp_path / "outs"
    parent.mkdir()
    return parent / "merged"


@pytest.fixture(scope="session")
def mergex_mod():
    # A plain import: a package that fails to import must fail the tests, not skip them.
    import mergex

    return mergex


@pytest.fixture
def run_merge(mergex_mod):
    """``run_merge(config_dict, out, **kw)`` -> loaded :class:`models.Output`.

    Defaults to the smallest RAM budget (so every big tensor spans many chunks), two
    threads (so the chunk size does not depend on the machine's core count) and no
    progress bar.
    """

    def run(config: dict, out: Path, **kw) -> models.Output:
        kw.setdefault("ram_budget", "64KiB")
        kw.setdefault("threads", 2)
        kw.setdefault("progress", False)
        mergex_mod.merge(models._plain(config), out, **kw)
        return models.read_output(out)

    return run
