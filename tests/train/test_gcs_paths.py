"""Run directories and checkpoints at gs:// URIs (`llm.train.paths`, etils.epath), against a
fake gs:// that maps every URI to a local directory (`tests/train/fake_gcs.py`): the same
code path as a real bucket down to epath's backend and TensorStore's kvstore driver. Code that
bypassed the abstraction would write a local `gs:` directory; the tests check there is none."""

import json
import os
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest

from llm.train import checkpoint
from llm.train.manifest import write_manifest
from llm.train.metrics import MetricsWriter, plot_loss, read_metrics
from llm.train.state import TrainState
from tests.conftest import REPO, run_experiment, tiny_run_args
from tests.train import fake_gcs


@pytest.fixture
def gcs_root(tmp_path, monkeypatch):
    """A fake gs:// rooted in tmp_path for this test (patches undone afterwards)."""
    from etils.epath import gpath
    from orbax.checkpoint._src.path import gcs_utils

    from llm.train import paths

    root = str(tmp_path / "gcs")
    monkeypatch.setattr(gpath, "_PREFIX_TO_BACKEND", dict(gpath._PREFIX_TO_BACKEND))
    monkeypatch.setattr(gpath, "_is_tf_installed", gpath._is_tf_installed)
    for name in ("get_kvstore_for_gcs", "is_hierarchical_namespace_enabled"):
        monkeypatch.setattr(gcs_utils, name, getattr(gcs_utils, name))
    monkeypatch.setattr(paths, "require_bucket_client", paths.require_bucket_client)
    monkeypatch.chdir(tmp_path)  # a stray local "gs:" directory would land here
    fake_gcs.install(root)
    return root


@pytest.mark.parametrize("where", ["local", "gs"])
def test_run_files_and_checkpoint_round_trip(where, tmp_path, gcs_root):
    run_dir = "gs://bucket/runs/r" if where == "gs" else str(tmp_path / "local" / "r")
    on_disk = os.path.join(gcs_root, "bucket/runs/r") if where == "gs" else run_dir
    write_manifest(run_dir, mesh_shape={"data": 1}, seed=3, data={"fingerprint": "f"})
    writer = MetricsWriter(run_dir)
    for step, loss in ((1, 2.5), (2, 2.0), (2, 1.5)):  # step 2 rewritten, as after a resume
        writer.write(step, {"loss": loss})
    writer.write(2, {"loss": 1.7}, prefix="eval")
    writer.close()
    plot_loss(run_dir)
    assert json.loads(Path(on_disk, "manifest.json").read_text())["seed"] == 3
    assert Path(on_disk, "config.gin").is_file()
    assert read_metrics(f"{run_dir}/metrics.jsonl") == [{"step": 1, "loss": 2.5},
                                                        {"step": 2, "loss": 1.5}]
    assert [r["loss"] for r in read_metrics(f"{run_dir}/eval_metrics.jsonl")] == [1.7]
    with open(os.path.join(on_disk, "plots", "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = os.listdir(os.path.join(on_disk, "tb"))
    assert len(events) == 1 and os.path.getsize(os.path.join(on_disk, "tb", events[0])) > 0

    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=params,
                       opt_state=optax.adam(0.1).init(params))
    # The state alone; the data iterator's part is tested in tests/data/test_elastic_resume.py.
    manager = checkpoint.checkpoint_manager(f"{run_dir}/checkpoints", async_save=False)
    manager.save(7, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    assert os.path.isdir(os.path.join(on_disk, "checkpoints", "7"))
    zero = TrainState(step=jnp.asarray(0, jnp.int32), params={"w": jnp.zeros((2, 3))},
                      opt_state=optax.adam(0.1).init({"w": jnp.zeros((2, 3))}))
    restored = checkpoint.checkpoint_manager(f"{run_dir}/checkpoints").restore(
        7, args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardRestore(checkpoint.abstract_state(zero))))
    assert int(restored["state"].step) == 7
    assert jnp.array_equal(restored["state"].params["w"], params["w"])
    assert not os.path.exists(tmp_path / "gs:")


def test_pretrain_cli_on_gs_run_dir_resumes(tiny_data, tmp_path):
    """The CLI with pretrain.run_dir='gs://...': every run file lands in the bucket, and a
    second launch restores the checkpoint from it (model and data position) and evaluates to
    the same validation loss, bit for bit."""
    root, uri = str(tmp_path / "gcs"), "gs://bucket/runs/tiny"
    args = [root, "experiments.pretrain_ntp",
            *tiny_run_args(uri, tiny_data, "--gin_param=TrainConfig.steps=4",
                           "--gin_param=checkpoint_manager.save_every=2")]
    run_experiment("tests.train.fake_gcs", args)
    run = os.path.join(root, "bucket/runs/tiny")
    for name in ("manifest.json", "config.gin", "metrics.jsonl", "eval.json",
                 "plots/loss.png", "checkpoints/4"):
        assert os.path.exists(os.path.join(run, name)), name
    first = json.loads(Path(run, "eval.json").read_text())
    again = run_experiment("tests.train.fake_gcs", args)
    assert "resumed from step 4 of 4" in again.stdout
    assert json.loads(Path(run, "eval.json").read_text())["loss"] == first["loss"]
    assert not os.path.exists(os.path.join(REPO, "gs:"))
