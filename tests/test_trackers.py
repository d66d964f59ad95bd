"""The logger group's stores with the real libraries, offline: MLflow in a SQLite file,
Weights & Biases in offline mode (its run files read back), across a SIGTERM and a
resume (a parallel sweep's MLflow runs: tests/test_sweeps.py's joblib sweep)."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY, read_jsonl, run_cli
from tests.test_resume import stop_in_second_epoch

TRACKED = [
    *TINY,
    "data.num_train=3000",  # long enough epochs for the signal to land in the second
    "trainer.epochs=3",
    "trainer.progress_bar=false",
    "diagnostics.figures_every_n_epochs=3",  # one confusion matrix, at the end
    "logger=[mlflow,wandb,csv]",
    "logger.log_checkpoint=true",
]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No network: W&B offline, its own files under tmp_path; MLflow's default store."""
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "MLFLOW_TRACKING_URI": "",
    }


def store(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")


def artifacts(client, run_id: str, folder: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def wandb_records(path: Path) -> Iterator:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then
    LevelDB's log format (32 KiB blocks of records: crc, length, type; a record may span
    blocks), each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, or the LAST piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_history(run_file: Path) -> tuple[set[str], list[dict[str, str]]]:
    """The run ids and the history rows (key -> JSON text) in an offline run file."""
    ids, rows = set(), []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
        elif kind == "history":
            items = record.history.item  # a key is in key, or in nested_key's one element
            rows.append({item.key or ".".join(item.nested_key): item.value_json for item in items})
    return ids, rows


@pytest.mark.slow
def test_one_mlflow_run_and_one_wandb_run_across_sigterm_and_resume(tmp_path: Path):
    pytest.importorskip("mlflow")  # the test command installs the extras (.[dev])
    pytest.importorskip("wandb")
    env = offline_env(tmp_path)
    run_dir = tmp_path / "outputs" / "2026-12-03" / "10-00-00"
    stop_in_second_epoch(TRACKED, run_dir, cwd=tmp_path, env=env)

    client = store(tmp_path)
    (stopped,) = client.search_runs([client.get_experiment_by_name("stable-cnn").experiment_id])
    assert stopped.info.status == "KILLED", "a stopped run is not left running"
    assert stopped.data.tags["stable_cnn.ended"] == "interrupted"

    done = run_cli([*TRACKED, f"hydra.run.dir={run_dir}", "trainer.resume=auto"], tmp_path, env)
    assert done.returncode == 0, done.stderr + done.stdout
    epochs = read_jsonl(run_dir / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]

    # MLflow: still one run, finished, with the config, one point per epoch, the files
    (run,) = client.search_runs([stopped.info.experiment_id])
    assert run.info.run_id == stopped.info.run_id
    assert (run.info.status, run.info.run_name) == ("FINISHED", "2026-12-03/10-00-00")
    assert run.data.params["model.width"] == "8"
    assert run.data.params["trainer.epochs"] == "3"
    assert run.data.params["data.num_train"] == "3000"
    assert run.data.tags["override.model.width"] == "8", "the keys the command set, tagged"
    val = client.get_metric_history(run.info.run_id, "accuracy/val")
    assert [(m.step, m.value) for m in val] == [(e["global_step"], e["val_acc"]) for e in epochs]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
    assert steps == sorted(set(steps)), "no step twice, though the run was stopped mid-epoch"
    assert steps[-1] == epochs[-1]["global_step"]
    results = json.loads((run_dir / "results.json").read_text())
    (test,) = client.get_metric_history(run.info.run_id, "accuracy/test")
    assert test.value == pytest.approx(results["test_acc"])
    files = artifacts(client, run.info.run_id)
    last = epochs[-1]["global_step"]
    assert {
        "config/config.yaml",
        "results.json",
        "checkpoints/best.pt",
        f"figures/confusion_matrix_val_step{last:07d}.png",
    } <= set(files)

    # W&B: two offline folders (before and after the resume) of one run id, no step twice
    run_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    (first_ids, first_rows), (second_ids, second_rows) = map(wandb_history, run_files)
    assert first_ids == second_ids and len(first_ids) == 1
    logged = [int(row["_step"]) for row in first_rows + second_rows]
    assert logged == sorted(set(logged))
    val_rows = [row for row in first_rows + second_rows if "accuracy/val" in row]
    assert [(int(r["_step"]), json.loads(r["accuracy/val"])) for r in val_rows] == [
        (e["global_step"], e["val_acc"]) for e in epochs
    ]
    figure = val_rows[-1]["predictions/confusion_matrix_val.path"]  # with the last epoch's
    assert (run_files[1].parent / "files" / json.loads(figure)).is_file()
    assert (run_files[1].parent / "files" / "results.json").exists()
    assert [e["epoch"] for e in read_csv_rows(run_dir / "metrics.csv")] == ["1", "2", "3"]


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as rows:
        return list(csv.DictReader(rows))


def assert_two_child_runs_of_one_mlflow_run(cwd: Path, sweep: Path, output: str) -> None:
    """What a 2-job sweep of ``optimizer.lr=0.01,0.1`` with ``logger=mlflow`` leaves in
    the default store (tests/test_sweeps.py runs it with joblib, side by side)."""
    assert "database is locked" not in output
    client = store(cwd)
    runs = client.search_runs([client.get_experiment_by_name("stable-cnn").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["stable_cnn.sweep"] == str(sweep)
    assert sorted(r.data.tags["swept.optimizer.lr"] for r in children) == ["0.01", "0.1"]
    names = sorted(r.info.run_name for r in children)
    assert names == ["0_optimizer.lr=0.01", "1_optimizer.lr=0.1"], "named like their folders"
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.params["optimizer.lr"] == r.data.tags["swept.optimizer.lr"] for r in children)


def test_a_store_that_cannot_be_used_is_one_line_before_anything_runs(tmp_path: Path):
    folder_store = run_cli(
        [*TINY, "logger=mlflow", "logger.tracking_uri=mlruns"], tmp_path, offline_env(tmp_path)
    )
    assert folder_store.returncode != 0
    assert (
        "error: logger.tracking_uri=mlruns is a folder store, which MLflow refuses since 3.13: "
        "use a database (sqlite:///outputs/mlflow.db) or a server (http://HOST:5000)"
    ) in folder_store.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()

    # a machine without the extra: the package's import fails, as it does where it is absent
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    missing = run_cli(
        [*TINY, "logger=[csv,wandb]"],
        tmp_path,
        {**offline_env(tmp_path), "PYTHONPATH": f"{hide}:{':'.join(sys.path)}"},
    )
    assert missing.returncode != 0
    assert (
        "error: logger=wandb needs the wandb package: pip install 'stable-cnn[wandb]' "
        "(or pip install wandb)"
    ) in missing.stdout
    assert len(missing.stdout.strip().splitlines()) == 1, missing.stdout
    assert not (tmp_path / "outputs").exists()


def test_a_tracking_server_that_does_not_answer_is_one_line_at_once():
    from stable_cnn.errors import ConfigError
    from stable_cnn.training.mlflow_tracker import check_server

    with pytest.raises(ConfigError, match=r"no MLflow server answers at http://127.0.0.1:9/ "):
        check_server("http://127.0.0.1:9/", timeout=5)


def test_a_preset_chosen_on_the_command_line_is_labelled_with_its_name():
    """What the stores tag (and TensorBoard's HPARAMS shows) for ``experiment=smoke``."""
    from hydra import compose, initialize_config_dir

    from stable_cnn.cli.conf import config_dir
    from stable_cnn.cli.train import hparams_of

    overrides = ["experiment=smoke", "model.width=8"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    hparams = hparams_of(cfg, dict(cfg.hydra.runtime.choices), overrides)
    assert hparams.values["experiment"] == "smoke", "was null: the preset is no config key"
    assert hparams.values["model.width"] == 8
    assert hparams.varied == {"experiment", "model.width"}


def test_a_store_that_fails_is_a_warning_and_the_run_goes_on(tmp_path: Path, caplog):
    from stable_cnn.training.tracking import RunTracker

    class Unreachable:  # a store whose server went away mid-run
        run_id = "r"

        def commit(self) -> None:
            raise ConnectionError("server closed the connection")

        def close(self, status: str) -> None:
            raise ConnectionError("server closed the connection")

    tracker = RunTracker(tmp_path, stores=[Unreachable()])
    tracker.commit()
    tracker.close()
    assert caplog.text.count("Unreachable: server closed the connection; the run goes on") == 2
    assert tracker.closed


def test_what_no_checkpoint_covers_is_sent_only_by_a_run_that_will_not_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A failed or interrupted run resumes from its checkpoint and logs those steps again;
    the reopened run is the same MLflow run, its params written once."""
    pytest.importorskip("mlflow")
    from stable_cnn.config.logger import LoggerConfig
    from stable_cnn.training.mlflow_tracker import MlflowTracker
    from stable_cnn.training.trackers import RunLabels

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    labels = RunLabels("2026-12-03/10-00-00", tmp_path, "unit", {"model.width": 8})
    logger = LoggerConfig(mlflow=True)
    first = MlflowTracker(logger, labels, None)
    first.log_scalars(3, {"loss/train": 1.0})
    first.commit()  # a checkpoint at step 3
    first.log_scalars(5, {"loss/train": 0.5})
    first.close("failed")
    client = store(tmp_path)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/train")] == [3]
    assert client.get_run(first.run_id).info.status == "FAILED"

    again = MlflowTracker(logger, labels, first.run_id)
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_scalars(5, {"loss/train": 0.5})
    again.close("finished")
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/train")] == [3, 5]
    run = client.get_run(first.run_id)
    assert (run.info.status, run.data.params["model.width"]) == ("FINISHED", "8")
    assert len(client.search_runs([run.info.experiment_id])) == 1
