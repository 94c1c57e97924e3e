"""Fixtures of the masked-LM tests."""

import pytest


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment for experiment subprocesses that shares one persistent XLA compilation cache,
    so a resumed or repeated run loads its programs instead of recompiling them (a run's compile
    time is most of a tiny run's time)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
