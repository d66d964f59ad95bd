"""logger=mlflow: one MLflow run per stable-cnn run, in a database store.

The store is ``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///outputs/mlflow.db`` (MLflow refuses folder stores since 3.13). A run gets
the composed config as params, TensorBoard's scalars under their names and steps (sent
in batches when a checkpoint covers them), the figures, config, results.json and, with
``logger.log_checkpoint``, best.pt. Its id is saved in the checkpoints, so a resume
reopens it. A sweep's jobs are child runs of one run per sweep, which SweepCallback
opens before the jobs start: the database and the experiment exist before any job
opens the store, and every call that meets "database is locked" is tried again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from stable_cnn.config.logger import LoggerConfig
from stable_cnn.errors import ConfigError
from stable_cnn.training.trackers import ENDED_FOR_GOOD, RunLabels, as_text, one_line

log = logging.getLogger("stable_cnn")

T = TypeVar("T")

DEFAULT_STORE = Path("outputs") / "mlflow.db"
SWEEP_RUN = "STABLE_CNN_MLFLOW_SWEEP_RUN"  # set by SweepCallback for the sweep's jobs
# how a run ended (failure.json's status) -> MLflow's run status
STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "pruned": "KILLED"}
LOCK_WAITS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)  # seconds, then once more, then the error
PARAMS_PER_CALL = 100  # MLflow's log_batch limits
METRICS_PER_CALL = 1000
MAX_PENDING = 200_000  # metrics held while the store fails, at the most


def tracking_uri(configured: str | None) -> str:
    """The store's URI; a SQLite file's path made absolute (sweep jobs and workers may
    start elsewhere)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    folder = scheme == "file" or (scheme == "" and uri not in ("databricks", "databricks-uc"))
    if folder and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        raise ConfigError(
            f"logger.tracking_uri={uri} is a folder store, which MLflow refuses since 3.13: "
            f"use a database (sqlite:///outputs/mlflow.db) or a server (http://HOST:5000)"
        )
    if scheme != "sqlite":
        return uri
    path = Path(uri.removeprefix("sqlite:///"))
    return f"sqlite:///{path if path.is_absolute() else Path.cwd() / path}"


def retried(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call``, tried again with a growing, jittered wait while SQLite says "database is
    locked" (parallel sweep jobs writing one file); any other error at once."""
    for wait in LOCK_WAITS:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err):
                raise
            time.sleep(wait * random.uniform(1.0, 1.5))
    return call(*args, **kwargs)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Only one process at a time opens a SQLite store for the first time (MLflow creates
    and migrates its tables then: two that race break the file) and creates experiments:
    a lock on the file's folder (not on the file, whose locks are SQLite's own)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    folder = Path(uri.removeprefix("sqlite:///")).parent
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        with suppress(OSError):  # a filesystem without flock: the retries are left
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # and the lock with it


def client_for(uri: str) -> Any:
    """An MlflowClient on ``uri`` (the mlflow package is an extra)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            "logger=mlflow needs the mlflow package: pip install 'stable-cnn[mlflow]' "
            "(or pip install mlflow)"
        ) from None
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The experiment called ``name``, created the first time (a SQLite store's artifacts
    go beside its file, in mlflow-artifacts/)."""
    found = retried(client.get_experiment_by_name, name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ConfigError(
            f"MLflow experiment {name!r} is deleted in {uri}: restore it (mlflow "
            f"experiments restore --experiment-id {found.experiment_id}) or set "
            f"logger.experiment=ANOTHER"
        )
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        folder = re.sub(r"[^\w.-]", "_", name)
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts" / folder
        location = root.as_uri()
    try:
        return retried(client.create_experiment, name, artifact_location=location)
    except Exception as err:  # a server's other client created it just now
        if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        return retried(client.get_experiment_by_name, name).experiment_id


def check_server(uri: str, timeout: float = 10.0) -> None:
    """A tracking server that does not answer at all is one line now, not MLflow's
    retries for minutes; any HTTP answer (even an error: a proxy, a login) will do."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as err:  # refused, no route, no such host, timed out
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):  # it answered; MLflow has its own certificates
            return
        raise ConfigError(
            f"logger=mlflow: no MLflow server answers at {uri} ({reason}): start it, or "
            f"check logger.tracking_uri or $MLFLOW_TRACKING_URI"
        ) from None


def open_store(logger: LoggerConfig, experiment: str) -> tuple[Any, str, str]:
    """The client, the store's URI and the experiment's id."""
    uri = tracking_uri(logger.tracking_uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        with store_lock(uri):
            client = client_for(uri)
            return client, uri, experiment_id(client, uri, logger.experiment or experiment)
    except ConfigError:
        raise
    except Exception as err:  # a file that is not a store, an old schema, a missing driver
        raise ConfigError(
            f"logger=mlflow: the store {uri} did not open ({one_line(err)}): check "
            f"logger.tracking_uri or $MLFLOW_TRACKING_URI"
        ) from None


def start_sweep_run(logger: LoggerConfig, experiment: str, sweep_dir: str) -> str:
    """A sweep's own run, the parent of its jobs' runs; its id."""
    client, _, experiment_id_ = open_store(logger, experiment)
    tags = {"stable_cnn.sweep": str(Path(sweep_dir).resolve())}
    run = retried(client.create_run, experiment_id_, run_name=sweep_dir, tags=tags)
    return run.info.run_id


def end_sweep_run(logger: LoggerConfig, run_id: str, status: str) -> None:
    """End a sweep's run with ``status``, unless it has ended already."""
    client = client_for(tracking_uri(logger.tracking_uri))
    if retried(client.get_run, run_id).info.status == "RUNNING":
        retried(client.set_terminated, run_id, status)


class MlflowTracker:
    """A stable-cnn run's MLflow run (rank 0's store)."""

    def __init__(self, logger: LoggerConfig, labels: RunLabels, run_id: str | None) -> None:
        self.labels, self.log_checkpoint = labels, logger.log_checkpoint
        self.client, self.uri, experiment = open_store(logger, labels.experiment)
        self.pending: list[Any] = []  # metrics logged since the last commit
        self.run_id: str | None = None
        known = self._reopened(run_id) if run_id is not None else None
        if known is None:
            self.run_id = retried(self.client.create_run, experiment, **self._new_run()).info.run_id
        try:  # a run that opened does not stay RUNNING when the rest fails
            if known is None:
                self._log_files([".hydra/config.yaml", ".hydra/overrides.yaml"], "config")
            self._log_params(known or {})
        except BaseException:
            with suppress(Exception):
                retried(self.client.set_terminated, self.run_id, "FAILED")
            raise
        log.info("MLflow run %s in %s (experiment %s)", self.run_id, self.uri, experiment)

    def _new_run(self) -> dict[str, Any]:
        """A new run's name and tags: its folder, its sweep and the sweep's run, the keys
        that set it apart."""
        labels = self.labels
        tags = {"stable_cnn.run_dir": str(labels.folder.resolve())}
        varied = "swept" if labels.sweep is not None else "override"
        tags |= {f"{varied}.{key}": value for key, value in labels.varied.items()}
        if labels.sweep is not None:
            tags["stable_cnn.sweep"] = str(Path(labels.sweep).resolve())
        if "mlflow" in labels.parent_runs:
            tags["mlflow.parentRunId"] = labels.parent_runs["mlflow"]
        return {"run_name": labels.name, "tags": tags}

    def _reopened(self, run_id: str) -> dict[str, str] | None:
        """Continue the run a checkpoint names: its params so far; None where this store
        does not have it (another tracking URI) or it was deleted: a new run, then."""
        try:
            run = retried(self.client.get_run, run_id)
        except Exception as err:
            if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s is not in %s: this run starts a new one", run_id, self.uri)
            return None
        retried(self.client.update_run, run_id, status="RUNNING")
        self.run_id = run_id
        return dict(run.data.params)

    def _log_params(self, known: dict[str, str]) -> None:
        """The composed config, but what the run has already: a param is written once."""
        from mlflow.entities import Param

        params = {
            param_key(key): as_text(value)[:6000] for key, value in self.labels.params.items()
        }
        new = [Param(key, value) for key, value in params.items() if key not in known]
        for first in range(0, len(new), PARAMS_PER_CALL):
            retried(self.client.log_batch, self.run_id, params=new[first : first + PARAMS_PER_CALL])

    def log_scalars(self, global_step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for tag, value in scalars.items():
            if value is not None:
                self.pending.append(Metric(tag, float(value), now, global_step))

    def log_figure(self, global_step: int, tag: str, figure: Any) -> None:
        name = f"figures/{tag.rsplit('/', 1)[-1]}_step{global_step:07d}.png"
        retried(self.client.log_figure, self.run_id, figure, name)

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass  # the epoch's scalars came through log_scalars

    def log_results(self, results: dict[str, Any]) -> None:
        self._log_files(["results.json"], None)
        if self.log_checkpoint:
            self._log_files(["checkpoints/best.pt"], "checkpoints")

    def commit(self) -> None:
        """Send what the checkpoint covers; a batch leaves the list once MLflow has it
        (a store that fails now is tried again at the next commit)."""
        if len(self.pending) > MAX_PENDING:  # the store failed for long: keep the latest
            self.pending = self.pending[-MAX_PENDING:]
        while self.pending:
            retried(self.client.log_batch, self.run_id, metrics=self.pending[:METRICS_PER_CALL])
            del self.pending[:METRICS_PER_CALL]

    def close(self, status: str) -> None:
        from mlflow.entities import RunTag

        if status not in ENDED_FOR_GOOD:  # no checkpoint covers them: the resume logs them
            self.pending = []
        try:
            self.commit()
            ended = RunTag("stable_cnn.ended", status)
            retried(self.client.log_batch, self.run_id, tags=[ended])
        finally:
            retried(self.client.set_terminated, self.run_id, STATUS.get(status, "FAILED"))

    def _log_files(self, names: list[str], artifact_path: str | None) -> None:
        for name in names:
            path = self.labels.folder / name
            if path.is_file():
                retried(self.client.log_artifact, self.run_id, str(path), artifact_path)


def param_key(key: str) -> str:
    """A config key as MLflow takes it (letters, digits, ``_-. /``)."""
    return re.sub(r"[^\w\-. /]", "_", key)[:250]
