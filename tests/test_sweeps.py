"""Sweeps users can trust: multirun grids with seeds, Optuna studies that continue,
parallel and submitit launchers, diverging jobs, presets, the sweep report and
TensorBoard's HPARAMS tab (queried from a real tensorboard server)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, run_cli
from tests.test_resume import wait_for_epochs

pytestmark = pytest.mark.slow

# 192 images to train on, 128 to validate and to test: a job is a few steps, and the
# sweeps' own work (folders, failures, reports, studies) is what these tests check.
ONE_EPOCH = [
    *TINY,
    "trainer.epochs=1",
    "trainer.progress_bar=false",
    "data.num_train=320",
    "data.num_test=128",
]


def job(sweep: Path, number: int | str) -> Path:
    """A sweep job's folder: its number, then the swept overrides (0_optimizer.lr=0.01)."""
    (folder,) = [p for p in sweep.iterdir() if p.name.split("_", 1)[0] == str(number)]
    return folder


def report_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "report.csv").open() as table:
        return list(csv.DictReader(table))


def assert_png(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory) -> Path:
    """2 learning rates x 2 seeds, run once for the tests that read it."""
    sweep = tmp_path_factory.mktemp("sweeps") / "grid"
    done = run_cli(
        [
            "-m",
            *ONE_EPOCH,
            "trainer.epochs=2",
            "optimizer.lr=0.01,0.1",
            "trainer.seed=range(2)",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=sweep.parent,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return sweep


def test_a_grid_sweep_ends_with_a_report_that_aggregates_seeds(seeded_sweep: Path):
    assert sorted(p.name for p in seeded_sweep.glob("[0-9]*")) == [
        "0_optimizer.lr=0.01,trainer.seed=0",
        "1_optimizer.lr=0.01,trainer.seed=1",
        "2_optimizer.lr=0.1,trainer.seed=0",
        "3_optimizer.lr=0.1,trainer.seed=1",
    ], "each job's folder says what it is: the swept keys, not the shared ones"
    rows = report_rows(seeded_sweep)
    assert [row["run"] for row in rows] != []
    assert sorted(row["run"] for row in rows) == ["optimizer.lr=0.01", "optimizer.lr=0.1"]
    for row in rows:
        assert row["runs"] == "2" and row["finished"] == "2"
        folders = row["folders"].split(";")
        accuracies = [
            json.loads((Path(f) / "results.json").read_text())["best_val_acc"] for f in folders
        ]
        assert float(row["best_val_acc_mean"]) == pytest.approx(sum(accuracies) / 2)
        assert float(row["best_val_acc_std"]) == pytest.approx(
            abs(accuracies[0] - accuracies[1]) / 2**0.5
        )
        f1 = [json.loads((Path(f) / "results.json").read_text())["test_f1"] for f in folders]
        assert float(row["test_f1_mean"]) == pytest.approx(sum(f1) / 2)
    means = [float(row["best_val_acc_mean"]) for row in rows]
    assert means == sorted(means, reverse=True), "best first"
    markdown = (seeded_sweep / "report.md").read_text()
    assert "| `optimizer.lr=0.1` | 2/2 |" in markdown and " ± " in markdown
    assert "| test acc (%) | test macro-F1 (%) | test top-5 (%) | epochs |" in markdown
    assert "Common to every run: `data=synthetic model.width=8" in markdown
    assert_png(seeded_sweep / "val_acc.png")


def test_report_command_sorts_by_the_chosen_metric(seeded_sweep: Path, tmp_path: Path):
    report = str(Path(sys.executable).parent / "stable-cnn-report")
    done = subprocess.run(
        [report, str(seeded_sweep), "--metric", "test_acc", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Sweep report") and "sorted by test_acc" in done.stdout
    tests = [float(row["test_acc_mean"]) for row in report_rows(tmp_path)]
    assert tests == sorted(tests, reverse=True)
    missing = subprocess.run(
        [report, str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"stable-cnn-report: error: {tmp_path / 'nowhere'} is not a folder: pass a sweep or "
        f"run folder (e.g. outputs/)"
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_shows_every_run_with_its_hparams_and_final_metrics(seeded_sweep: Path):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(seeded_sweep),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # until the server answers (and has read the runs)
            try:
                with urllib.request.urlopen(base + "/data/runs", timeout=1) as response:
                    if len(json.loads(response.read())) == 4:
                        break
            except OSError:
                pass
            assert server.poll() is None, "tensorboard exited"
            time.sleep(0.1)
        with urllib.request.urlopen(base + "/data/plugin/scalars/tags", timeout=30) as response:
            tags = json.loads(response.read())
        runs = sorted(tags)
        assert [run.split("_", 1)[0] for run in runs] == ["0", "1", "2", "3"]
        wanted = {"loss/train", "accuracy/val", "accuracy/test", "accuracy/best_val"}
        assert wanted <= set(tags[runs[0]])

        experiment = post_json(base + "/data/plugin/hparams/experiment", {"experimentName": ""})
        columns = [info["name"] for info in experiment["hparamInfos"]]
        assert {"optimizer.lr", "trainer.seed", "model.width", "optimizer"} <= set(columns)
        # the swept keys come first: the table shows the first few without ticking
        assert columns[:2] == ["optimizer.lr", "trainer.seed"], columns
        metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
        assert metrics == {
            "accuracy/best_val",
            "run/best_monitored",
            "accuracy/test",
            "run/wall_s",
            "run/epochs",
        }

        groups = post_json(
            base + "/data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "startIndex": 0,
                "sliceSize": 100,
                "colParams": [],
                "allowedStatuses": [
                    "STATUS_UNKNOWN",
                    "STATUS_SUCCESS",
                    "STATUS_FAILURE",
                    "STATUS_RUNNING",
                ],
            },
        )["sessionGroups"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert sorted(group["name"].split("_", 1)[0] for group in groups) == ["0", "1", "2", "3"]
    for group in groups:
        results = json.loads((seeded_sweep / group["name"] / "results.json").read_text())
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["accuracy/test"] == pytest.approx(results["test_acc"])
        assert values["accuracy/best_val"] == pytest.approx(results["best_val_acc"])
        assert values["run/best_monitored"] == pytest.approx(results["best_val_acc"])  # val_acc
        assert group["sessions"][0]["status"] == "STATUS_SUCCESS"
    lrs = sorted(group["hparams"]["optimizer.lr"] for group in groups)
    assert lrs == [0.01, 0.01, 0.1, 0.1]


def test_a_diverging_job_is_reported_and_the_sweep_goes_on(tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = run_cli(
        [
            "-m",
            *TINY,  # 512 images to train on: steps enough to diverge in
            "trainer.epochs=1",
            "trainer.progress_bar=false",
            "clipping=none",
            "amp=off",
            "trainer.on_nonfinite=stop",
            "optimizer.lr=1e6,0.05",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, "a diverged job is a result, not a broken sweep"
    assert "returning 0.0 to the sweeper for this diverged job" in done.stderr + done.stdout
    failure = json.loads((job(sweep, 0) / "failure.json").read_text())
    assert failure["status"] == "diverged" and failure["reason"].startswith("non-finite loss")
    assert (job(sweep, 1) / "results.json").exists(), "the job after the diverged one still ran"
    rows = {row["run"]: row for row in report_rows(sweep)}
    assert rows["optimizer.lr=1e+06"]["status"] == "diverged"
    assert rows["optimizer.lr=1e+06"]["reason"].startswith("non-finite loss at step")
    assert rows["optimizer.lr=0.05"]["status"] == "finished"
    assert list(rows) == ["optimizer.lr=0.05", "optimizer.lr=1e+06"], "diverged runs last"


def test_a_job_with_a_bad_value_fails_alone_and_the_report_says_why(tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = run_cli(
        ["-m", *ONE_EPOCH, "model.dropout=1.5,0.1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert done.returncode != 0, "a broken job makes the sweep fail"
    assert (job(sweep, 1) / "results.json").exists(), "the other job still ran"
    report = subprocess.run(
        [str(Path(sys.executable).parent / "stable-cnn-report"), str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    rows = {row["run"]: row for row in report_rows(sweep)}
    assert rows["model.dropout=1.5"]["status"] == "failed"
    assert rows["model.dropout=1.5"]["reason"].startswith("model.dropout=1.5 is not allowed")


def test_optuna_search_continues_its_study_when_rerun(tmp_path: Path):
    optuna = pytest.importorskip("optuna")
    command = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *ONE_EPOCH]
    first = run_cli(command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    time.sleep(1.1)  # each invocation's folder is named by the second it started
    second = run_cli(command, cwd=tmp_path)
    assert second.returncode == 0, second.stderr + second.stdout

    study_dir = tmp_path / "outputs" / "optuna" / "synthetic-small_cnn"  # a study per data, model
    study = optuna.load_study(
        study_name="synthetic-small_cnn", storage=f"sqlite:///{study_dir / 'study.db'}"
    )
    assert len(study.trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    learning_rates = {t.params["optimizer.lr"] for t in study.trials}
    assert len(learning_rates) == 6, "the continued study proposes new trials"
    assert all(0.005 <= lr <= 0.3 for lr in learning_rates)
    invocations = sorted(p for p in study_dir.iterdir() if p.is_dir())
    assert len(invocations) == 2
    for invocation, numbers in zip(invocations, (["0", "1", "2"], ["3", "4", "5"]), strict=True):
        jobs = sorted(p.name for p in invocation.glob("[0-9]*"))
        assert [name.split("_", 1)[0] for name in jobs] == numbers, "a job's folder: its trial"
        assert all("optimizer.lr=" in name for name in jobs), "named by the searched keys"
    rows = report_rows(study_dir)
    assert len(rows) == 6 and all(row["status"] == "finished" for row in rows)
    best = max(float(row["best_val_acc_mean"]) for row in rows)
    assert study.best_value == pytest.approx(best)

    other = run_cli([*command, "trainer.epochs=2"], cwd=tmp_path)  # other epochs, same study
    lines = [line for line in (other.stdout + other.stderr).splitlines() if "error:" in line]
    assert other.returncode == 2 and len(lines) == 1, other.stdout + other.stderr
    assert "trainer.epochs=2 (the study's: 1)" in lines[0] and "study_name" in lines[0]
    storage = f"sqlite:///{study_dir / 'study.db'}"
    again = optuna.load_study(study_name="synthetic-small_cnn", storage=storage)
    assert len(again.trials) == 6, "the refused search added no trial"
    assert len([p for p in study_dir.iterdir() if p.is_dir()]) == 2, "and left no folder"


def test_joblib_runs_jobs_side_by_side_with_divided_threads(tmp_path: Path):
    """Also logger=mlflow: parallel jobs on one SQLite store are two child runs of the
    sweep's run (tests/test_trackers.py checks them)."""
    pytest.importorskip("mlflow")  # the test command installs it (.[dev])
    from tests.test_trackers import assert_two_child_runs_of_one_mlflow_run, offline_env

    sweep = tmp_path / "multirun" / "sweep"
    done = run_cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *ONE_EPOCH,
            "optimizer.lr=0.01,0.1",
            "logger=mlflow",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=offline_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for number in (0, 1):
        assert (job(sweep, number) / "results.json").exists()
        log = (job(sweep, number) / "train.log").read_text()
        assert f"jobs run side by side: {threads} torch thread(s) each" in log
        assert f"device cpu, {threads} threads" in log
    assert_two_child_runs_of_one_mlflow_run(tmp_path, sweep, done.stdout + done.stderr)


def test_submitit_local_launcher_really_runs_a_job(tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = run_cli(
        ["-m", "hydra/launcher=submitit_local", *ONE_EPOCH, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads((job(sweep, 0) / "results.json").read_text())["epochs"] == 1
    assert list((sweep / ".submitit").glob("*/*_log.out")), "submitit ran it as its own job"


def test_a_job_of_several_tasks_is_one_distributed_run(tmp_path: Path):
    """tasks_per_node=2: submitit starts two processes per job, as SLURM would; they find
    each other through submitit's environment and train one run together."""
    sweep = tmp_path / "sweep"
    done = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            *ONE_EPOCH,
            "data.batch_size=64",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    results = json.loads((job(sweep, 0) / "results.json").read_text())
    assert results["processes"] == 2 and results["epochs"] == 1
    assert len(list((job(sweep, 0)).glob("events.out.tfevents.*"))) == 1, "one writer"
    assert len((job(sweep, 0) / "metrics.jsonl").read_text().splitlines()) == 1


def test_slurm_launcher_config_composes_with_its_defaults(tmp_path: Path):
    done = run_cli(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "--cfg",
            "hydra",
            "-p",
            "hydra.launcher",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for line in (
        "gpus_per_node: 1",
        "partition: gpu",
        "timeout_min: 240",
        "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    ):
        assert line in done.stdout


def test_every_preset_composes_and_runs(tmp_path: Path):
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert {
        "tutorial",
        "fashion_mnist_fast",
        "fashion_mnist_best",
        "cifar10",
        "fashion_mnist_resnet18",
    } <= set(presets)
    sweep = tmp_path / "sweep"
    # The presets' own choices first, then the tiny settings on top of each; each keeps
    # its own model (a width would be refused by the ResNet preset).
    # 128 images to train on (two batches), 64 to validate and to test: the widest
    # presets and the ResNet-18 go through one epoch in seconds.
    tiny = [arg for arg in ONE_EPOCH if not arg.startswith("model.")]
    few = ["data.num_train=192", "data.val_size=64", "data.num_test=64"]
    done = run_cli(
        ["-m", "experiment=glob(*)", *tiny, *few, f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr + done.stdout
    rows = report_rows(sweep)
    assert sorted(row["run"] for row in rows) == [f"experiment={p}" for p in presets]
    assert all(row["status"] == "finished" for row in rows)


def test_an_interrupted_sweep_resumes_its_unfinished_jobs_only(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *TINY,
        "data.num_train=3000",
        "trainer.epochs=4",
        "trainer.progress_bar=false",
        "optimizer.lr=0.01,0.05",
        f"hydra.sweep.dir={sweep}",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "stable_cnn.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first, second = sweep / "0_optimizer.lr=0.01", sweep / "1_optimizer.lr=0.05"
    wait_for_epochs(second, 1, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    assert (first / "results.json").exists() and not (second / "results.json").exists()
    assert json.loads((second / "failure.json").read_text())["status"] == "interrupted"
    finished_at = (first / "results.json").stat().st_mtime_ns

    done = run_cli([*args, "trainer.resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (first / "results.json").stat().st_mtime_ns == finished_at, "not retrained"
    log = done.stdout + done.stderr
    assert f"run {first} already finished" in log
    assert f"resuming from {second / 'checkpoints' / 'last.pt'}" in log
    assert json.loads((second / "results.json").read_text())["epochs"] == 4
    assert not (second / "failure.json").exists()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [first.name, second.name]
    assert [row["status"] for row in report_rows(sweep)] == ["finished", "finished"]


def test_the_stock_search_space_reads_as_optuna_distributions():
    """conf/hparams_search/optuna.yaml's expressions become Optuna >= 4 distributions; a
    key fixed on the command line leaves the space."""
    optuna = pytest.importorskip("optuna")
    import yaml

    from stable_cnn.cli.optuna_space import grid_of, search_space

    assert int(optuna.__version__.split(".")[0]) >= 4
    params = yaml.safe_load((REPO / "conf/hparams_search/optuna.yaml").read_text())
    stock = [f"{key}={value}" for key, value in params["hydra"]["sweeper"]["params"].items()]
    space, fixed = search_space([*stock, "model.width=16"])
    assert fixed == {"model.width": "16"} and "model.width" not in space
    lr = space["optimizer.lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    assert (lr.low, lr.high) == (0.005, 0.3)
    assert not space["model.dropout"].log
    grid, _ = search_space(["model.width=choice(8,16,32)", "data.batch_size=range(32,129,32)"])
    assert grid_of(grid) == {"model.width": [8, 16, 32], "data.batch_size": [32, 64, 96, 128]}
    steps, _ = search_space(["a=range(0.0,1.0,0.3)", "b=range(0,10,4)"])  # Hydra's values
    assert grid_of(steps)["a"] == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert grid_of(steps)["b"] == [0, 4, 8]


def test_a_grid_search_runs_the_grid_once_and_refuses_intervals(tmp_path: Path):
    pytest.importorskip("optuna")
    refused = run_cli(
        ["-m", "hparams_search=optuna", "hydra.sweeper.sampler=grid", *ONE_EPOCH], cwd=tmp_path
    )
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if "error" in line]
    assert refused.returncode != 0 and len(errors) == 1, refused.stdout + refused.stderr
    assert "sampler=grid needs a finite set for optimizer.lr" in errors[0]
    assert not (tmp_path / "outputs").exists(), "a refused search leaves nothing behind"
    fixed = [
        "optimizer.lr=0.05",
        "optimizer.weight_decay=0.0001",
        "model.dropout=0.1",
        "model.head_dropout=0.1",
        "clipping.max_norm=1.0",
    ]
    grid_args = [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.sampler=grid",
        *ONE_EPOCH,
        *fixed,
        "model.width=choice(8,16)",
        "hydra.sweeper.n_trials=5",
    ]
    done = run_cli(grid_args, cwd=tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    jobs = list((tmp_path / "outputs" / "optuna" / "synthetic-small_cnn").glob("*/[0-9]*"))
    widths = sorted(job.name.split("model.width=")[1].split(",")[0] for job in jobs)
    assert widths == ["16", "8"], "each point of the grid once, though 5 trials were asked"
    time.sleep(1.1)  # an invocation's folder is named by its second
    again = run_cli(grid_args, cwd=tmp_path)
    assert again.returncode == 0 and "the grid's 2 points have all run" in again.stdout
    assert (
        len(list((tmp_path / "outputs" / "optuna" / "synthetic-small_cnn").glob("*/[0-9]*"))) == 2
    )


def test_the_stock_space_searches_what_another_model_has(tmp_path: Path):
    """model=resnet has no dropout or width, clipping=none no use for a max norm: those
    keys leave the stock space (one line each) and the search runs on, in a study of its
    own."""
    pytest.importorskip("optuna")
    small = [arg for arg in ONE_EPOCH if not arg.startswith("model.")]
    search = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *small]
    done = run_cli([*search, "model=resnet", "clipping=none", "data.limit_train=128"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for key in ("model.dropout", "model.head_dropout", "model.width"):
        assert f"{key} is not a key of this run's config: it leaves the search" in done.stdout
    assert "clipping.max_norm means nothing with clipping=none" in done.stdout
    (job,) = (tmp_path / "outputs" / "optuna" / "synthetic-resnet").glob("*/0_*")
    assert "optimizer.lr=" in job.name and "model.dropout" not in job.name
    assert "clipping.max_norm" not in job.name


def test_your_own_search_space_extends_the_stock_one(tmp_path: Path):
    """A search space in your own config folder (--config-dir) starts from the stock one
    and changes one range and pins one key, without copying the file."""
    optuna = pytest.importorskip("optuna")
    mine = tmp_path / "my_conf" / "hparams_search"
    mine.mkdir(parents=True)
    (mine / "narrow.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - optuna\n"
        "hydra:\n  sweeper:\n    params:\n"
        "      optimizer.lr: tag(log, interval(0.01, 0.02))\n"
        "      model.width: 8\n"
    )
    done = run_cli(
        [
            "-m",
            "--config-dir",
            str(tmp_path / "my_conf"),
            "hparams_search=narrow",
            "hydra.sweeper.n_trials=2",
            *ONE_EPOCH,
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    study_dir = tmp_path / "outputs" / "optuna" / "synthetic-small_cnn"
    storage = f"sqlite:///{study_dir / 'study.db'}"
    trials = optuna.load_study(study_name="synthetic-small_cnn", storage=storage).trials
    assert len(trials) == 2 and all(0.01 <= t.params["optimizer.lr"] <= 0.02 for t in trials)
    assert all("model.dropout" in t.params and "model.width" not in t.params for t in trials)


def test_a_job_folder_names_every_key_a_search_varies(monkeypatch):
    """Keys the search adds (+model.depth in hydra.sweeper.params, as a search space of
    your own may) name the job's folder as the keys it changes do; the rest do not."""
    from omegaconf import OmegaConf

    from stable_cnn.cli.sweeps import SWEPT_KEYS, job_folder, swept_keys

    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["data=synthetic"]},
                "sweeper": {"params": {"+model.depth": "choice(1, 2)", "optimizer.lr": "x"}},
            }
        }
    )
    keys = swept_keys(config)
    assert keys == ["model.depth", "optimizer.lr"]
    monkeypatch.setenv(SWEPT_KEYS, ",".join(keys))
    name = job_folder(3, "+model.depth=2,data=synthetic,optimizer.lr=0.05")
    assert name == "3_+model.depth=2,optimizer.lr=0.05"
