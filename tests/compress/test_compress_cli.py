"""experiments.compress end to end on a tiny run: the report, the compressed checkpoint (packed
codes + scales), the sampler and the evaluator on it, and bad input as one-line errors."""

from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
import pytest

from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.serve.sampler import generate
from tests.conftest import run_experiment

FAST = ["--gin_param=compress.eval_batches=1", "--gin_param=compress.eval_batch_size=2",
        "--gin_param=compress.prefill_len=16", "--gin_param=compress.decode_tokens=4",
        "--gin_param=compress.speed_repeats=1", "--gin_param=compress.calibration_batches=1",
        "--gin_param=compress.calibration_batch_size=2", "--gin_param=compress.group_size=32"]


def test_quantized_tiny_model_generates_through_sampler():
    cfg = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                      vocab_size=256)
    graphdef, params = transformer.init(cfg, jax.random.key(0))
    _, _, axes = transformer.abstract(cfg)
    qparams = Q.quantize_params(params, axes, method="int4", group_size=32)
    assert isinstance(qparams["layer_0"]["attn"]["o"]["kernel"], Q.QArray)
    prompts = [[5, 6, 7], [9]]
    out = generate(graphdef, qparams, cfg, prompts, max_new_tokens=6, temperature=0.0, eos_id=-1)
    ref = generate(graphdef, Q.dequantize_params(qparams), cfg, prompts, max_new_tokens=6,
                   temperature=0.0, eos_id=-1)
    assert out == ref and all(len(r) == 6 for r in out)


@pytest.fixture(scope="module")
def int4_report(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compress"))
    run_experiment("experiments.compress", [f"--run_dir={tiny_run}", "--method=gptq-int4",
                                            f"--out_dir={out}", *FAST])
    return out


def test_report_and_packed_checkpoint(int4_report, tiny_run):
    d = os.path.join(int4_report, "compress", "gptq-int4")
    with open(os.path.join(d, "report.json")) as f:
        r = json.load(f)
    for k in ("bits_per_byte", "perplexity", "checkpoint_bytes", "params", "nonzero",
              "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert k in r["original"] and k in r["compressed"]
    assert r["compressed"]["checkpoint_bytes"] < 0.35 * r["original"]["checkpoint_bytes"]
    assert os.path.isfile(os.path.join(d, "report.md"))
    assert os.path.isfile(os.path.join(int4_report, "compress", "quality_vs_size.png"))

    from llm.compress.checkpoint import load_compressed_run
    from llm.eval.lm import LanguageModel

    run = load_compressed_run(os.path.join(d, "checkpoint"), method="gptq-int4")
    q = run.params["layer_0"]["mlp"]["wo"]["kernel"]
    assert q.codes.dtype == np.uint8 and q.codes.shape[0] * 2 == q.shape[0]  # two per byte
    assert generate(run.graphdef, run.params, run.cfg, [[3, 4]], max_new_tokens=3,
                    temperature=0.0, eos_id=-1)[0].__len__() == 3
    lm = LanguageModel(run, batch_size=2, progress=False)
    (ll, _), = lm.loglikelihood([("def f(x):", " return x")])
    assert np.isfinite(ll) and ll < 0


def test_wrong_method_is_one_line_error(int4_report):
    from llm.compress.checkpoint import load_compressed_run

    with pytest.raises(ConfigError) as e:
        load_compressed_run(os.path.join(int4_report, "compress", "gptq-int4", "checkpoint"),
                            method="int8")
    assert "'gptq-int4'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,needle", [
    (["--method=int3"], "--method='int3'"),
    (["--method=int4", "--gin_param=compress.group_size=48"], "group_size=48"),
    (["--method=magnitude", "--gin_param=compress.sparsity=1.0"], "sparsity=1.0"),
    (["--method=wanda", "--gin_param=compress.calibration_batches=0"], "calibration set is empty"),
])
def test_bad_input_one_line_exit_2(tiny_run, tmp_path, args, needle):
    from experiments import compress

    gin.clear_config()
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = compress.main([f"--run_dir={tiny_run}", f"--out_dir={tmp_path}", *args])
    finally:
        gin.clear_config()
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err.getvalue()


def test_bad_input_through_real_cli(tmp_path):
    proc = run_experiment("experiments.compress", [f"--run_dir={tmp_path}/nope", "--method=int8"],
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_checkpoint_relabelled_as_another_method_is_one_line(int4_report, tmp_path):
    """A GPTQ-int4 checkpoint whose compress.json is rewritten to claim int8 (a consistent int8
    layout, or a broken group size): load_run, which every CLI uses, raises one-line DataErrors
    instead of loading codes under the wrong method."""
    import math
    import shutil

    from llm.data.sources import DataError
    from llm.runs import load_run

    src = os.path.join(int4_report, "compress", "gptq-int4", "checkpoint")
    for name, group in (("int8", None), ("bad_group", 0)):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        with open(dst / "compress.json") as f:
            record = json.load(f)
        record["method"] = "int8"
        for m in record["quantized"].values():
            k = math.prod(m["shape"][d] for d in m["contraction"])
            m.update(method="int8", group_size=k if group is None else group)
        (dst / "compress.json").write_text(json.dumps(record))
        with pytest.raises(DataError) as e:
            load_run(str(dst))
        assert "\n" not in str(e.value)
        assert ("does not match" if group is None else "not a layout") in str(e.value)
