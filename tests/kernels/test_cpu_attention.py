"""The C++ CPU flash-attention kernel (`llm.kernels.cpu_attention`, attention_impl="cpu_flash")
against the plain-jnp reference: forward and gradients (causal / bidirectional, packed segments,
GQA/MQA, lengths that are not a multiple of its 64-row tiles, rows with no allowed key, head
dims 16-128); bitwise the same on one thread as on two; the "auto" dispatch (the kernel on CPU,
the jnp branch when lowering for TPU, the jnp fallback when no compiler is found); and the
errors for what it does not cover."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.config import ConfigError
from llm.kernels import cpu_attention
from llm.kernels.cpu_attention import cpu_flash_attention
from llm.kernels.reference import mha_reference
from llm.model.attention import attend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ok, why = cpu_attention.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"CPU kernel unavailable: {why}")


def _inputs(b, seq, heads, kv_heads, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, seq, heads, d))
    k = jax.random.normal(ks[1], (b, seq, kv_heads, d))
    v = jax.random.normal(ks[2], (b, seq, kv_heads, d))
    w = jax.random.normal(ks[3], (b, seq, heads, d))  # output cotangent
    return q, k, v, w


def _packed(b, seq, seed):
    """Segment ids of packed documents of random lengths, the last one cut by the row end."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(b):
        bounds = np.sort(rng.choice(np.arange(1, seq), size=5, replace=False))
        rows.append(np.searchsorted(bounds, np.arange(seq), side="right") + 10 * r + 1)
    return np.asarray(rows, np.int32)


SEG36 = np.array([[1] * 9 + [2] * 14 + [3] * 13, [4] * 20 + [5] * 10 + [0] * 6], np.int32)
# Query segment 7 has no key of its own: those rows give 0 (and zero gradients), as the reference.
SEG36_Q = np.array([[1] * 9 + [2] * 14 + [3] * 13, [4] * 20 + [5] * 10 + [7] * 6], np.int32)

CASES = {
    # name: (batch, seq, heads, kv_heads, head_dim, causal, q_seg, kv_seg)
    "causal_one_tile": (2, 36, 4, 4, 64, True, None, None),
    "causal_packed_gqa": (2, 36, 4, 2, 32, True, SEG36, SEG36),
    "bidirectional_packed_mqa": (2, 36, 4, 1, 16, False, SEG36, SEG36),
    "empty_rows": (2, 36, 2, 2, 32, False, SEG36_Q, SEG36),
    "causal_many_tiles_packed": (2, 200, 4, 2, 32, True, _packed(2, 200, 0), _packed(2, 200, 0)),
    "bidirectional_many_tiles": (1, 130, 2, 2, 128, False, None, None),
    "causal_exact_tiles": (1, 256, 2, 1, 64, True, None, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grads_match_reference(name):
    b, seq, heads, kv_heads, d, causal, q_seg, kv_seg = CASES[name]
    q, k, v, w = _inputs(b, seq, heads, kv_heads, d)
    kw = dict(causal=causal, q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
              kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg))

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v, **kw) * w),
                                          argnums=(0, 1, 2)))

    out = jax.jit(lambda q, k, v: cpu_flash_attention(q, k, v, **kw))(q, k, v)
    ref = mha_reference(q, k, v, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    (l_ours, g_ours), (l_ref, g_ref) = loss(cpu_flash_attention)(q, k, v), \
        loss(mha_reference)(q, k, v)
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-5)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-4)
    if name == "empty_rows":  # rows of query segment 7: output and dq exactly 0
        assert not np.any(np.asarray(out)[1, 30:]) and not np.any(np.asarray(g_ours[0])[1, 30:])


_THREADS_PROBE = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {repo!r})
from llm.kernels.cpu_attention import cpu_flash_attention
parts = []
for b, kv_heads in ((2, 2), (1, 1)):
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (b, 300, 4, 32)); w = jax.random.normal(ks[3], (b, 300, 4, 32))
    k = jax.random.normal(ks[1], (b, 300, kv_heads, 32))
    v = jax.random.normal(ks[2], (b, 300, kv_heads, 32))
    out, grads = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(cpu_flash_attention(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    parts += [np.ravel(np.asarray(x)) for x in (out, *grads)]
np.save(sys.argv[1], np.concatenate(parts))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_bitwise_equal_on_one_and_two_threads(tmp_path):
    """Each task of the kernel is computed by one thread in a fixed order, so the result does
    not depend on how many threads share the work (XLA sizes its pool from the CPU affinity).
    With one sequence and one kv head on two threads the backward takes its two-pass schedule
    (one pass on one thread): the same bits too."""
    script = tmp_path / "probe.py"
    script.write_text(_THREADS_PROBE.format(repo=REPO))
    cpus = sorted(os.sched_getaffinity(0))
    results = []
    for n in (1, 2):
        path = tmp_path / f"r{n}.npy"
        subprocess.run(["taskset", "-c", ",".join(map(str, cpus[:n])), sys.executable,
                        str(script), str(path)], check=True, cwd=REPO, timeout=300)
        results.append(np.load(path))
    np.testing.assert_array_equal(results[0], results[1])


def test_auto_uses_the_kernel_on_cpu_and_jnp_elsewhere():
    """attention_impl="auto" lowers to the kernel's custom calls on CPU; lowered for TPU (an
    AOT check from this CPU) it holds the jnp blocked loop instead and no CPU custom call."""
    q, k, v, _ = _inputs(1, 300, 4, 2, 32)

    def f(q, k, v):
        return attend(q, k, v, segment_ids=None, causal=True, impl="auto").sum()

    cpu = jax.jit(jax.grad(f)).lower(q, k, v).as_text()
    assert cpu.count("llm_cpu_flash_attention_fwd") == 1
    assert cpu.count("llm_cpu_flash_attention_bwd") == 1
    tpu = jax.export.export(jax.jit(f), platforms=("tpu",))(q, k, v).mlir_module()
    assert "llm_cpu_flash_attention" not in tpu and "stablehlo.while" in tpu


def test_auto_falls_back_without_a_compiler(monkeypatch):
    """No C++ compiler: "auto" runs the jnp blocked loop (same numbers), "cpu_flash" is a
    one-line ConfigError naming the setting and the fix."""
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_attention, "_load", cpu_attention._load.__wrapped__)
    assert cpu_attention.available() == (False, "no C++ compiler found ($CXX, g++ or clang++)")
    q, k, v, _ = _inputs(1, 300, 4, 2, 32)
    text = jax.jit(lambda q, k, v: attend(q, k, v, segment_ids=None, causal=True,
                                          impl="auto")).lower(q, k, v).as_text()
    assert "llm_cpu_flash_attention" not in text and "stablehlo.while" in text
    with pytest.raises(ConfigError, match=r"attention_impl='cpu_flash' cannot run here: no C\+\+"
                                          r" compiler.*'xla_blocked'"):
        attend(q, k, v, segment_ids=None, causal=True, impl="cpu_flash")


@pytest.mark.parametrize("case", ["bf16", "prefix", "cross", "head_dim"])
def test_what_it_does_not_cover_is_a_clear_error(case):
    q, k, v, _ = _inputs(1, 40, 2, 2, 32)
    kw = dict(segment_ids=None, causal=True, impl="cpu_flash")
    if case == "bf16":
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        match = "dtype bfloat16"
    elif case == "prefix":
        kw["prefix"] = jnp.ones((1, 40), jnp.int32)
        match = "prefix-LM"
    elif case == "cross":
        k, v = k[:, :20], v[:, :20]
        kw["causal"] = False
        match = "q_len 40 != kv_len 20"
    else:
        q, k, v = q[..., :24], k[..., :24], v[..., :24]
        match = "head_dim 24"
    with pytest.raises(ConfigError, match=match):
        attend(q, k, v, **kw)
    # ...while "auto" quietly takes the jnp path for the same arguments.
    kw["impl"] = "auto"
    assert attend(q, k, v, **kw).shape == q.shape
