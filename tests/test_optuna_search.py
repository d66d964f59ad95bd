"""Searches that scale (hparams_search=optuna on stable-cnn's own sweeper): trials that
the pruner stops, trials side by side without batches, one study shared by concurrent
searches on SQLite, a journal file and a real PostgreSQL server, the trials a killed
search left running, a pruned trial of a two-process run, and a study an old Optuna made."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from tests.test_sweeps import job, report_rows

pytestmark = pytest.mark.slow

optuna = pytest.importorskip("optuna")
TWO_EPOCHS = [*TINY, "trainer.progress_bar=false"]  # TINY trains 2 epochs
ONE_EPOCH = [*TWO_EPOCHS, "trainer.epochs=1"]
SEARCH = ["-m", "hparams_search=optuna"]
NEVER_GOOD_ENOUGH = ["hydra.sweeper.pruner=threshold", "hydra.sweeper.pruners.threshold.lower=101"]
State = optuna.trial.TrialState


def study_of(study_dir: Path, storage: str | None = None, name: str = "synthetic-small_cnn"):
    return optuna.load_study(
        study_name=name, storage=storage or f"sqlite:///{study_dir / 'study.db'}"
    )


def test_pruned_trials_stop_early_and_trials_run_side_by_side(tmp_path: Path):
    """A trial whose epoch is poor stops there (PRUNED, its epochs reported, a pruned run
    folder, exit 0); then 2 workers keep 2 trials running, each reporting every epoch."""
    pruned = run_cli(
        [*SEARCH, "hydra.sweeper.n_trials=2", *NEVER_GOOD_ENOUGH, *TWO_EPOCHS], cwd=tmp_path
    )
    output = pruned.stdout + pruned.stderr
    assert pruned.returncode == 0, output
    study_dir = tmp_path / "outputs" / "optuna" / "synthetic-small_cnn"
    study = study_of(study_dir)
    assert [t.state for t in study.trials] == [State.PRUNED, State.PRUNED]
    assert all(list(t.intermediate_values) == [1] for t in study.trials), "stopped at epoch 1"
    (invocation,) = [p for p in study_dir.iterdir() if p.is_dir()]
    for number in (0, 1):
        folder = job(invocation, number)
        failure = json.loads((folder / "failure.json").read_text())
        assert failure["status"] == "pruned" and failure["reason"].startswith("after epoch 1")
        assert (folder / "checkpoints" / "last.pt").is_file(), "it can be continued"
        assert not (folder / "results.json").exists()
        assert f"trial {number} pruned after epoch 1" in output
    rows = report_rows(study_dir)
    assert (
        all(row["status"] == "pruned" and row["reason"].startswith("after epoch 1") for row in rows)
        and len(rows) == 2
    )

    time.sleep(1.1)  # each invocation's folder is named by the second it started
    side = run_cli(
        [*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", *TWO_EPOCHS], cwd=tmp_path
    )
    output = side.stdout + side.stderr
    assert side.returncode == 0, output
    assert "2 worker processes run trials side by side" in output
    assert "[trial 2] " in output and "[trial 4] " in output, "each worker's lines say whose"
    study = study_of(study_dir)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    new = study.trials[2:]
    assert all(t.state == State.COMPLETE and list(t.intermediate_values) == [1, 2] for t in new)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in new)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), (
        "two trials ran at the same time"
    )
    summary = json.loads((study_dir / "study.json").read_text())
    assert summary["states"] == {"PRUNED": 2, "COMPLETE": 3}
    assert summary["best_trial"] == study.best_trial.number
    assert Path(summary["best_run_folder"]).name.startswith(f"{study.best_trial.number}_")
    report = (study_dir / "report.md").read_text()
    assert "## Study synthetic-small_cnn" in report
    assert f"Best: trial {study.best_trial.number}" in report

    time.sleep(1.1)
    pruned_side = run_cli(
        [
            *SEARCH,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            *NEVER_GOOD_ENOUGH,
            *TWO_EPOCHS,
        ],
        cwd=tmp_path,
    )
    assert pruned_side.returncode == 0, pruned_side.stdout + pruned_side.stderr
    last = study_of(study_dir).trials[5:]
    assert [t.state for t in last] == [State.PRUNED] * 2, "pruned in worker processes too"
    assert all(list(t.intermediate_values) == [1] for t in last)


def test_a_refused_trial_in_a_worker_process_fails_alone_with_its_reason(tmp_path: Path):
    done = run_cli(
        [
            *SEARCH,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.study_name=refused",
            "model.dropout=1.5",
            *ONE_EPOCH,
        ],
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    study = study_of(tmp_path / "outputs" / "optuna" / "refused", name="refused")
    assert [t.state for t in study.trials] == [State.FAIL, State.FAIL]
    for number in (0, 1):
        assert f"trial {number} failed: model.dropout=1.5 is not allowed" in output


def test_a_trial_value_is_written_as_hydra_reads_it():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from stable_cnn.cli.optuna_trials import hydra_value

    for value in ("a,b", "001", "x y", "it's", "abc", "null", 8, 0.5, True, 1e-05):
        (override,) = OverridesParser.create().parse_overrides([f"k={hydra_value(value)}"])
        assert override.value() == value and type(override.value()) is type(value), value
    assert hydra_value("abc") == "abc", "a plain word stays plain (job folder names)"


def test_a_trial_left_running_by_a_killed_search_is_marked_failed(tmp_path: Path):
    command = [
        sys.executable,
        "-m",
        "stable_cnn.train",
        *SEARCH,
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.heartbeat_s=1",
        *TWO_EPOCHS,
        "trainer.epochs=40",
    ]
    search = subprocess.Popen(
        command,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    study_dir = tmp_path / "outputs" / "optuna" / "synthetic-small_cnn"
    deadline = time.monotonic() + 300
    while not list(study_dir.glob("*/0_*/metrics.jsonl")):
        assert search.poll() is None and time.monotonic() < deadline, "the trial never trained"
        time.sleep(0.05)
    os.killpg(search.pid, signal.SIGKILL)  # no chance to tell the study anything
    search.wait()
    assert study_of(study_dir).trials[0].state == State.RUNNING

    time.sleep(4.5)  # 4 heartbeats of 1 s missed: the worker is gone
    again = run_cli(
        [
            *SEARCH,
            "hydra.sweeper.n_trials=0",
            "hydra.sweeper.heartbeat_s=1",
            *TWO_EPOCHS,
            "trainer.epochs=40",
        ],
        cwd=tmp_path,
    )
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert "trial(s) 0 of study synthetic-small_cnn were left running by a worker" in output
    assert study_of(study_dir).trials[0].state == State.FAIL


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster (Debian's postgresql package: initdb, pg_ctl) on a
    free local port, as an unprivileged user; removed afterwards."""
    found = shutil.which("initdb") or next(
        iter(Path("/usr/lib/postgresql").glob("*/bin/initdb")), None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: bash scripts/setup.sh --dev installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(found).resolve().parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="stable-cnn-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    subprocess.run(
        [*as_user, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "stable"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [
            *as_user,
            bin_dir / "pg_ctl",
            "-D",
            data,
            "-o",
            options,
            "-l",
            folder / "server.log",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                *as_user,
                bin_dir / "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "stable",
                "studies",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://stable@127.0.0.1:{port}/studies"
    finally:
        subprocess.run(
            [*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("storage", ["sqlite", "journal", "postgresql"])
def test_three_searches_at_once_share_one_study(storage: str, tmp_path: Path, request):
    """The same command started 3 times at once (3 workers, or 3 machines on one
    database): one study, no trial number twice, as many trials as were asked for."""
    url = {
        "sqlite": None,  # the default: outputs/optuna/<study>/study.db
        "journal": f"journal://{tmp_path / 'study.log'}",
        "postgresql": request.getfixturevalue("postgres_url") if storage == "postgresql" else None,
    }[storage]
    command = [
        sys.executable,
        "-m",
        "stable_cnn.train",
        *SEARCH,
        "hydra.sweeper.n_trials=2",
        *ONE_EPOCH,
        *([f"hydra.sweeper.storage={url}"] if url else []),
    ]
    searches = [
        subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(3)
    ]
    outputs = [search.communicate(timeout=600)[0] for search in searches]
    assert all(search.returncode == 0 for search in searches), "\n".join(outputs)
    study_dir = tmp_path / "outputs" / "optuna" / "synthetic-small_cnn"
    if url is None:
        url = f"sqlite:///{study_dir / 'study.db'}"
    elif url.startswith("journal://"):
        backend = optuna.storages.journal.JournalFileBackend(url[len("journal://") :])
        url = optuna.storages.JournalStorage(backend)
    elif url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg://")
    trials = study_of(study_dir, url).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == State.COMPLETE for t in trials)
    folders = [p.name.split("_", 1)[0] for p in study_dir.glob("*/[0-9]*")]
    assert sorted(folders, key=int) == [str(n) for n in range(6)], "a folder per trial"


def test_a_trial_of_two_processes_is_pruned_by_rank_0(tmp_path: Path):
    done = run_cli(
        [*SEARCH, "hydra.sweeper.n_trials=1", *NEVER_GOOD_ENOUGH, *TWO_EPOCHS, "trainer.devices=2"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    study_dir = tmp_path / "outputs" / "optuna" / "synthetic-small_cnn"
    (trial,) = study_of(study_dir).trials
    assert trial.state == State.PRUNED and list(trial.intermediate_values) == [1]
    (folder,) = study_dir.glob("*/0_*")
    assert json.loads((folder / "failure.json").read_text())["status"] == "pruned"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1, "one epoch, logged once"


def test_a_study_made_by_optuna_2_10_opens_once_upgraded(tmp_path: Path):
    """tests/fixtures/old_study/study.db was written by Optuna 2.10.1 (scripts/
    old_study_fixture.py): refused in one line that gives the upgrade command, which
    then lets the search continue the old study."""
    old = tmp_path / "study.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "old_study" / "study.db", old)
    url = f"sqlite:///{old}"
    command = [
        *SEARCH,
        f"hydra.sweeper.storage={url}",
        "hydra.sweeper.study_name=search",
        "hydra.sweeper.n_trials=1",
        *ONE_EPOCH,
    ]
    refused = run_cli(command, cwd=tmp_path)
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if "error:" in line]
    assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
    assert f"optuna storage upgrade --storage {url}" in lines[0]
    assert not (tmp_path / "outputs").exists(), "a refused search leaves nothing behind"

    upgrade = [Path(sys.executable).parent / "optuna", "storage", "upgrade", "--storage", url]
    subprocess.run(upgrade, check=True, capture_output=True)
    done = run_cli(command, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = optuna.load_study(study_name="search", storage=url).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.value for t in trials[:3]] == [61.5, 74.25, 70.0], "the old trials are kept"
    assert trials[3].state == State.COMPLETE
