"""Shared fixtures: a small real corpus (part of this Python's standard library), prepared once
per test session, and a helper that runs an experiment in a fresh subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_EMAIL = os.path.join(os.path.dirname(os.__file__), "email", "*.py")

# A corpus of ~20 real files (the stdlib `email` package) and the tiny debug model.
TINY = [
    "--gin_file=gin_configs/debug/tiny.gin",
    "--gin_param=corpus.name='files'",
    f"--gin_param=text_files.pattern='{STDLIB_EMAIL}'",
    "--gin_param=prepare.validation_fraction=0.2",
]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where JAX's backend is a GPU. (`tpu` marks tests that
    compile for TPU ahead of time; they have their own skip conditions.)

    The tests of a module with a module-scoped fixture of its own (a training run, a server)
    form one xdist group, so `--dist loadgroup` (tools/run_tests.sh) computes that fixture on
    one worker instead of once per worker that happens to get one of its tests."""
    for item in items:
        module = item.nodeid.split("::")[0]
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope == "module" and d.baseid == module
               for fixture_defs in defs.values() for d in fixture_defs):
            item.add_marker(pytest.mark.xdist_group(module))
    marked = [i for i in items if i.get_closest_marker("gpu") is not None]
    if not marked:
        return
    import jax

    backend = jax.default_backend()
    if backend != "gpu":
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU (JAX backend: {backend})"))


# Experiment subprocesses share one persistent XLA compilation cache per test session (across
# xdist workers): a repeated or resumed tiny run loads its programs instead of recompiling them,
# and compiling is most of a tiny run's time.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
COMPILE_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), f"llm-xla-cache-{_RUN_ID}"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def run_experiment(module: str, args: list[str], *, env: dict | None = None,
                   timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """python -m <module> <args> from the repo root, in a subprocess with its own XLA flags and
    the session's shared compilation cache."""
    full_env = {**os.environ, **COMPILE_CACHE, **(env or {})}
    full_env.setdefault("XLA_FLAGS", "")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
                             f"\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_processes(module: str, args: list[str], num: int = 2) -> list[subprocess.Popen]:
    """`python -m <module> <args>` as `num` processes of one jax.distributed job on loopback
    (gloo collectives; `llm.parallel.mesh.initialize_distributed` reads the LLM_* variables),
    one CPU device each, sharing the session's compilation cache."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO, text=True,
        env={**os.environ, **COMPILE_CACHE, "XLA_FLAGS": "", "LLM_COORDINATOR": f"127.0.0.1:{port}",
             "LLM_NUM_PROCESSES": str(num), "LLM_PROCESS_ID": str(pid)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in range(num)]


def finish_processes(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Wait for every process; each must exit 0. Their stdouts."""
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def run_experiment_watched(module: str, args: list[str], *, stall_s: float = 600,
                           env: dict | None = None) -> subprocess.CompletedProcess:
    """Like `run_experiment`, but bounded by progress, not by total time: the run fails only if
    it writes nothing to stdout or stderr (tqdm updates every step) for `stall_s` seconds. A
    machine loaded by other work makes a long run slower, never a failure."""
    import threading
    import time

    full_env = {**os.environ, **COMPILE_CACHE, **(env or {})}
    full_env.setdefault("XLA_FLAGS", "")
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks = {"out": [], "err": []}
    last = [time.monotonic()]

    def pump(stream, key):
        for data in iter(lambda: stream.read1(4096), b""):
            chunks[key].append(data)
            last[0] = time.monotonic()

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    while proc.poll() is None:
        if time.monotonic() - last[0] > stall_s:
            proc.kill()
            proc.wait()
            break
        time.sleep(1)
    for t in threads:
        t.join()
    out = b"".join(chunks["out"]).decode(errors="replace")
    err = b"".join(chunks["err"]).decode(errors="replace")
    if proc.returncode != 0:
        stalled = f"no output for {stall_s:.0f} s; killed. " if proc.returncode < 0 else ""
        raise AssertionError(f"{module} exited {proc.returncode}. {stalled}\nstdout:\n"
                             f"{out[-4000:]}\nstderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A prepared data directory (tokenizer + shards) of the stdlib email package."""
    import gin

    from experiments import pretrain_ntp  # noqa: F401  (registers the experiment's bindings)
    from llm.config import parse_gin
    from llm.data import prepare as prepare_data

    data_dir = str(tmp_path_factory.mktemp("tiny_data"))
    with gin.unlock_config():
        parse_gin([os.path.join(REPO, "gin_configs/debug/tiny.gin")],
                  [a.split("=", 1)[1] for a in TINY[1:]])
    try:
        prepare_data.prepare(data_dir)
    finally:
        gin.clear_config()
    return data_dir


def tiny_run_args(run_dir, data_dir, *extra: str) -> list[str]:
    """pretrain_ntp arguments for a 12-step tiny run on `data_dir` (no sampling)."""
    return [*TINY, f"--gin_param=pretrain.data_dir='{data_dir}'",
            f"--gin_param=pretrain.run_dir='{run_dir}'", "--gin_param=pretrain.sample_prompt=''",
            "--gin_param=TrainConfig.steps=12", "--gin_param=checkpoint_manager.save_every=3",
            # A fixed peak: the measured one (a matmul timed at start-up) swings with the load of
            # a shared machine, and MFU with it.
            "--gin_param=peak_flops.per_device=1e11", *extra]


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> str:
    """The run directory of one uninterrupted 12-step tiny pretraining run."""
    run_dir = str(tmp_path_factory.mktemp("tiny_run"))
    run_experiment("experiments.pretrain_ntp", tiny_run_args(run_dir, tiny_data))
    return run_dir
