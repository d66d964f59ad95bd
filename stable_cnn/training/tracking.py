"""What a run leaves behind: TensorBoard scalars and hparams, metrics.jsonl, results.json,
and failure.json for a run that diverged or stopped.

Every scalar is plotted against the optimizer step (``global_step``), so train and
validation curves share one x axis; metrics.jsonl carries the epoch numbers.

TensorBoard's Time Series page shows one section per tag prefix, in alphabetical order,
so the prefixes are chosen to open on what matters: ``accuracy/`` and ``loss/`` first
(train, val, test, the weight average's), then ``predictions/`` (the confusion matrix),
``run/`` (speed, wall time), ``samples/`` (augmented images), and the diagnostics:
``stability/`` (learning rate, gradient norms and clipping, skipped steps, loss spikes)
and ``weights/`` (norms, BatchNorm statistics, histograms). A count that is zero by
construction in most runs (skipped steps, spikes) gets a chart from its first non-zero
value on, not a flat line at zero in every run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams.api_pb2 import (
    DataType,
    Experiment,
    HParamInfo,
    MetricInfo,
    MetricName,
    Status,
)
from tensorboard.plugins.hparams.metadata import (
    EXPERIMENT_TAG,
    PLUGIN_DATA_VERSION,
    PLUGIN_NAME,
    SESSION_END_INFO_TAG,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from stable_cnn.config.logger import LoggerConfig
from stable_cnn.state.run_files import FAILURE_FILE, read_metrics, record_failure
from stable_cnn.system.atomic import atomic_write
from stable_cnn.training.epoch import EpochStats
from stable_cnn.training.evaluation import EvalStats
from stable_cnn.training.trackers import RunLabels, Tracker, one_line, open_trackers

log = logging.getLogger("stable_cnn")


@dataclass(frozen=True)
class Hparams:
    """A run's hyperparameters for the HPARAMS tab (name -> value), and the names whose
    values set this run apart from the runs it is compared with (a sweep's swept keys,
    else the run's own command-line overrides): TensorBoard lists those first, and its
    table shows the first few, so the column a user wants is there without ticking it."""

    values: dict[str, str | float | int | bool] = field(default_factory=dict)
    varied: frozenset[str] = frozenset()


# The HPARAMS tab's metric columns: scalars logged once, when the run ends.
# run/best_monitored: the best value of trainer.monitor (a column beside the trainer.monitor one)
FINAL_METRICS = (
    "accuracy/best_val",
    "run/best_monitored",
    "accuracy/test",
    "run/wall_s",
    "run/epochs",
)
# Charts written only from their first non-zero value on (metrics.jsonl keeps every value).
SPARSE = {
    "stability/skipped_nonfinite": "nonfinite_steps",
    "stability/skipped_amp": "amp_skipped_steps",
    "stability/loss_spikes": "loss_spikes",
    "stability/clipped_fraction": "clip_fraction",
}


class RunTracker:
    """Opens the run's logs; a resumed run passes where its checkpoint stood, so that
    nothing logged after that point (before the interruption) shows twice."""

    writes = True  # False for the other processes of a distributed run (SilentTracker)

    def __init__(
        self,
        run_dir: Path,
        resume_step: int = 0,
        epochs_done: int = 0,
        stores: list[Tracker] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.stores = stores or []  # the logger group's, fed what TensorBoard is
        # how the run ended: finished (log_results), or how it stopped (record_failure)
        self.ended = "failed"
        self.closed = False
        self.metrics_path = run_dir / "metrics.jsonl"
        if resume_step > 0:
            self._truncate_metrics(epochs_done)
        # the sparse charts this run has started (a resumed run goes on with its own)
        self.started = {
            tag
            for tag, key in SPARSE.items()
            if any(record.get(key) for record in read_metrics(run_dir))
        }
        # purge_step hides the interrupted run's events from this step on in TensorBoard.
        purge_step = resume_step + 1 if resume_step > 0 else None
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def _truncate_metrics(self, epochs_done: int) -> None:
        if not self.metrics_path.exists():
            return
        # read_metrics skips a last line torn by a kill while it was being appended
        kept = [record for record in read_metrics(self.run_dir) if record["epoch"] <= epochs_done]
        with atomic_write(self.metrics_path) as out:
            out.write("".join(json.dumps(record) + "\n" for record in kept).encode())

    def log_step(self, global_step: int, scalars: dict[str, float]) -> None:
        """Scalars at a step (train/loss, train/lr, ...; an epoch's at its last step):
        TensorBoard, and every store of the logger group under the same names."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)
        self._each_store(lambda store: store.log_scalars(global_step, scalars))

    def log_epoch(
        self,
        epoch: int,
        lr: float,
        lr_peak: float,
        train: EpochStats,
        val: EvalStats,
        health: dict[str, float] | None = None,
        ema: EvalStats | None = None,
        class_names: tuple[str, ...] = (),
    ) -> None:
        """One line of metrics.jsonl, and the epoch's scalars in TensorBoard.
        ``lr`` is the learning rate the epoch started with, ``lr_peak`` its highest;
        ``health`` holds the model's
        per-stage weight norms and BatchNorm ranges (diagnostics.model_health); ``val``
        is the last step's weights' validation, ``ema`` the weight average's (ema=on)."""
        record = {
            "epoch": epoch,
            "global_step": train.global_step,
            "train_loss": train.loss,
            "train_acc": train.accuracy,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "lr": lr,
            "lr_peak": lr_peak,
            "grad_norm": train.grad_norm,
            "grad_norm_clipped": train.grad_norm_clipped,
            "clip_fraction": train.clip_fraction,
            "loss_spikes": train.loss_spikes,
            "train_img_s": train.images_per_second,
            "epoch_s": train.seconds,
            "nonfinite_steps": train.nonfinite_steps,
            "amp_skipped_steps": train.amp_skipped_steps,
        }
        if ema is not None:
            record.update(val_loss_ema=ema.loss, val_acc_ema=ema.accuracy)
        if class_names:  # macro-F1, top-5, per class (from the confusion matrix read once)
            record.update(val.summary("val", class_names))
        if class_names and ema is not None:  # what trainer.monitor=val_f1 or val_top5 reads
            record["val_f1_ema"] = ema.macro_f1
            if ema.top5 is not None:
                record["val_top5_ema"] = ema.top5
        with self.metrics_path.open("a") as out:
            out.write(json.dumps(_finite_or_none(record)) + "\n")
        self._each_store(lambda store: store.log_epoch(record))
        scalars = {
            "accuracy/train": train.accuracy,
            "accuracy/val": val.accuracy,
            "loss/train_epoch": train.loss,
            "loss/val": val.loss,
            "run/img_per_s": train.images_per_second,
            "stability/lr_epoch": lr,
            "stability/grad_norm_epoch": train.grad_norm,
            "stability/grad_norm_clipped_epoch": train.grad_norm_clipped,
            **{f"accuracy/{key}": record[key] for key in ("val_f1", "val_top5") if key in record},
            **(health or {}),
        }
        if ema is not None:
            scalars.update({"accuracy/val_ema": ema.accuracy, "loss/val_ema": ema.loss})
        for tag, key in SPARSE.items():
            if record[key] or tag in self.started:
                self.started.add(tag)
                scalars[tag] = record[key]
        self.log_step(train.global_step, scalars)
        self.writer.flush()

    def log_figures(
        self,
        global_step: int,
        weights: dict[str, torch.Tensor],
        gradients: dict[str, torch.Tensor],
        images: torch.Tensor | None,
        confusion: Any | None,
    ) -> None:
        """The every-N-epochs diagnostics: histograms per stage, a grid of augmented
        training images (uint8, N x C x H x W) and a confusion-matrix figure."""
        for stage, values in weights.items():
            self.writer.add_histogram(f"weights/{stage}", values, global_step)
        for stage, values in gradients.items():
            self.writer.add_histogram(f"weights/{stage}_gradient", values, global_step)
        if images is not None:
            from torchvision.utils import make_grid  # torchvision costs a second to import

            grid = make_grid(images.cpu(), nrow=int(len(images) ** 0.5), pad_value=255)
            self.writer.add_image("samples/augmented_train_images", grid, global_step)
        if confusion is not None:
            tag = "predictions/confusion_matrix_val"  # the stores first: TensorBoard closes it
            self._each_store(lambda store: store.log_figure(global_step, tag, confusion))
            self.writer.add_figure(
                "predictions/confusion_matrix_val", confusion, global_step, close=True
            )
        self.writer.flush()

    def log_results(self, results: dict[str, Any], global_step: int) -> None:
        """results.json, written atomically, and the test scalars."""
        scalars = {"accuracy/test": results["test_acc"], "loss/test": results["test_loss"]}
        for key in ("test_f1", "test_top5"):
            if key in results:
                scalars[f"accuracy/{key}"] = results[key]
        self.log_step(global_step, scalars)
        with atomic_write(self.run_dir / "results.json") as out:
            out.write((json.dumps(_finite_or_none(results), indent=2) + "\n").encode())
        (self.run_dir / FAILURE_FILE).unlink(missing_ok=True)  # a resumed run that now finished
        self.writer.flush()
        self.ended = "finished"
        self._each_store(lambda store: store.log_results(results))

    def log_hparams(
        self, hparams: Hparams, final: dict[str, float], succeeded: bool, global_step: int
    ) -> None:
        """One HPARAMS record for this run, in the run's own folder, so that
        ``tensorboard --logdir <sweep>`` lists every run of a sweep side by side.

        ``final`` maps the FINAL_METRICS tags that this run reached to their values;
        they are logged as scalars too, which is where the HPARAMS tab reads them.
        """
        self.log_step(global_step, final)  # the stores get them too
        _, session_start, _ = hparams_summaries(hparams.values, dict.fromkeys(FINAL_METRICS, 0.0))
        experiment = _experiment(hparams)
        status = "STATUS_SUCCESS" if succeeded else "STATUS_FAILURE"
        session_end = _session_end(Status.Value(status))
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary, global_step)
        self.writer.flush()

    def record_failure(self, status: str, reason: str, message: str) -> None:
        record_failure(self.run_dir, status, reason, message)
        self.ended = status

    def commit(self) -> None:
        """A checkpoint now holds the run up to here: the stores may send what they hold
        (what they sent before a kill is then never sent again by the resumed run)."""
        self._each_store(lambda store: store.commit())

    def close(self) -> None:
        """The end of the run's logs, however it ended (a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        self._each_store(lambda store: store.close(self.ended))

    def _each_store(self, call: Callable[[Tracker], None]) -> None:
        """``call`` on every store; one that fails is a warning and the run goes on: a
        store is a record of the run, never a reason to stop it (or to hide how it ended)."""
        for store in self.stores:
            try:
                call(store)
            except Exception as err:
                log.warning("%s: %s; the run goes on", type(store).__name__, one_line(err))


class SilentTracker(RunTracker):
    """The tracker of every process but rank 0: the run has one writer, so these
    processes compute what rank 0 logs (figures need every process under
    SyncBatchNorm) and write nothing."""

    writes = False

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def log_step(self, global_step: int, scalars: dict[str, float]) -> None:
        pass

    def log_epoch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_figures(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_results(self, results: dict[str, Any], global_step: int) -> None:
        pass

    def log_hparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_failure(self, status: str, reason: str, message: str) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(
    run_dir: Path,
    writes: bool,
    resume_step: int,
    epochs_done: int,
    logger: LoggerConfig | None = None,
    labels: RunLabels | None = None,
    run_ids: dict[str, str] | None = None,
) -> RunTracker:
    """The run's tracker on the process that ``writes`` (rank 0), with the stores
    ``logger`` turns on, naming the run by ``labels``; a store continues its run in
    ``run_ids`` (the checkpoint's), and a new one's id is added there. A silent
    tracker elsewhere."""
    if not writes:
        return SilentTracker(run_dir)
    labels = labels or RunLabels(run_dir.name, run_dir, "stable-cnn")
    tracker = RunTracker(run_dir, resume_step=resume_step, epochs_done=epochs_done)
    try:
        run_ids = {} if run_ids is None else run_ids
        stores = open_trackers(logger or LoggerConfig(), labels, run_ids, resume_step)
        tracker.stores = stores
    except BaseException:
        tracker.writer.close()
        raise
    return tracker


def _experiment(hparams: Hparams) -> Summary:
    """The HPARAMS tab's columns: every hparam (the varied ones marked ``differs``, which
    TensorBoard sorts first) and the FINAL_METRICS."""
    infos = [
        HParamInfo(name=name, type=_data_type(value), differs=name in hparams.varied)
        for name, value in hparams.values.items()
    ]
    metrics = [MetricInfo(name=MetricName(tag=tag)) for tag in FINAL_METRICS]
    content = HParamsPluginData(
        experiment=Experiment(hparam_infos=infos, metric_infos=metrics), version=PLUGIN_DATA_VERSION
    )
    return _plugin_summary(EXPERIMENT_TAG, content)


def _data_type(value: object) -> int:
    if isinstance(value, bool):
        return DataType.Value("DATA_TYPE_BOOL")
    if isinstance(value, int | float):
        return DataType.Value("DATA_TYPE_FLOAT64")
    return DataType.Value("DATA_TYPE_STRING")


def _plugin_summary(tag: str, content: HParamsPluginData) -> Summary:
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def _session_end(status: int) -> Summary:
    """A session-end summary with ``status`` (torch's helper always writes success)."""
    content = HParamsPluginData(
        session_end_info=SessionEndInfo(status=status), version=PLUGIN_DATA_VERSION
    )
    return _plugin_summary(SESSION_END_INFO_TAG, content)


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write null so that every JSON reader can parse the file."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
