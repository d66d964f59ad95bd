"""What a run leaves behind: TensorBoard scalars and hparams, metrics.jsonl, results.json,
and failure.json for a run that diverged or stopped.

Every scalar is plotted against the optimizer step (``global_step``), so train and
validation curves share one x axis; metrics.jsonl carries the epoch numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.metadata import (
    PLUGIN_DATA_VERSION,
    PLUGIN_NAME,
    SESSION_END_INFO_TAG,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from stable_cnn.atomic import atomic_write
from stable_cnn.engine import EpochStats, EvalStats

Hparams = dict[str, str | float | int | bool]

# The HPARAMS tab's metric columns: scalars logged once, when the run ends.
FINAL_METRICS = ("final/best_val_acc", "final/test_acc", "final/wall_s", "final/epochs")
FAILURE_FILE = "failure.json"


class RunTracker:
    """Opens the run's logs; a resumed run passes where its checkpoint stood, so that
    nothing logged after that point (before the interruption) shows twice."""

    writes = True  # False for the other processes of a distributed run (SilentTracker)

    def __init__(self, run_dir: Path, resume_step: int = 0, epochs_done: int = 0) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        if resume_step > 0:
            self._truncate_metrics(epochs_done)
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
        """Step-level scalars (train/loss, train/lr, ...): TensorBoard only."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)

    def log_epoch(
        self,
        epoch: int,
        lr: float,
        train: EpochStats,
        val: EvalStats,
        health: dict[str, float] | None = None,
        ema: EvalStats | None = None,
    ) -> None:
        """One line of metrics.jsonl, and the epoch's scalars in TensorBoard.
        ``lr`` is the learning rate the epoch started with; ``health`` holds the model's
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
        with self.metrics_path.open("a") as out:
            out.write(json.dumps(_finite_or_none(record)) + "\n")
        scalars = {
            "val/loss": val.loss,
            "val/acc": val.accuracy,
            "train/epoch_loss": train.loss,
            "train/epoch_acc": train.accuracy,
            "train/img_per_s": train.images_per_second,
            "train/nonfinite_steps": train.nonfinite_steps,
            "amp/skipped_steps": train.amp_skipped_steps,
            "train/epoch_lr": lr,
            "clipping/fraction_clipped": train.clip_fraction,
            "clipping/grad_norm_before": train.grad_norm,
            "clipping/grad_norm_after": train.grad_norm_clipped,
            "train/loss_spikes": train.loss_spikes,
            **(health or {}),
        }
        if ema is not None:
            scalars.update({"val/loss_ema": ema.loss, "val/acc_ema": ema.accuracy})
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
            self.writer.add_histogram(f"gradients/{stage}", values, global_step)
        if images is not None:
            from torchvision.utils import make_grid  # torchvision costs a second to import

            grid = make_grid(images.cpu(), nrow=int(len(images) ** 0.5), pad_value=255)
            self.writer.add_image("data/augmented_train_images", grid, global_step)
        if confusion is not None:
            self.writer.add_figure("val/confusion_matrix", confusion, global_step, close=True)
        self.writer.flush()

    def log_results(self, results: dict[str, Any], global_step: int) -> None:
        """results.json, written atomically, and the test scalars."""
        self.log_step(
            global_step, {"test/acc": results["test_acc"], "test/loss": results["test_loss"]}
        )
        with atomic_write(self.run_dir / "results.json") as out:
            out.write((json.dumps(_finite_or_none(results), indent=2) + "\n").encode())
        (self.run_dir / FAILURE_FILE).unlink(missing_ok=True)  # a resumed run that now finished
        self.writer.flush()

    def log_hparams(
        self, hparams: Hparams, final: dict[str, float], succeeded: bool, global_step: int
    ) -> None:
        """One HPARAMS record for this run, in the run's own folder, so that
        ``tensorboard --logdir <sweep>`` lists every run of a sweep side by side.

        ``final`` maps the FINAL_METRICS tags that this run reached to their values;
        they are logged as scalars too, which is where the HPARAMS tab reads them.
        """
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, global_step)
        experiment, session_start, session_end = hparams_summaries(
            hparams, dict.fromkeys(FINAL_METRICS, 0.0)
        )
        if not succeeded:
            session_end = _session_end(Status.Value("STATUS_FAILURE"))
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary, global_step)
        self.writer.flush()

    def record_failure(self, status: str, reason: str, message: str) -> None:
        record_failure(self.run_dir, status, reason, message)

    def close(self) -> None:
        self.writer.close()


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

    def close(self) -> None:
        pass


def open_tracker(run_dir: Path, writes: bool, resume_step: int, epochs_done: int) -> RunTracker:
    """The run's tracker on the process that ``writes`` (rank 0), a silent one elsewhere."""
    if not writes:
        return SilentTracker(run_dir)
    return RunTracker(run_dir, resume_step=resume_step, epochs_done=epochs_done)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of per-epoch records ([] when the run logged no epoch)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or cut short by a kill while appending
            continue
    return records


def record_failure(run_dir: Path, status: str, reason: str, message: str) -> None:
    """failure.json: why the run ended without results (read by stable-cnn-report).
    ``status`` is ``diverged`` (numbers went non-finite) or ``interrupted`` (a signal);
    ``reason`` is a few words for tables, ``message`` the full line that was logged."""
    record = {"status": status, "reason": reason, "message": message}
    with atomic_write(run_dir / FAILURE_FILE) as out:
        out.write((json.dumps(record, indent=2) + "\n").encode())


def read_failure(run_dir: Path) -> dict[str, str] | None:
    path = run_dir / FAILURE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _session_end(status: int) -> Summary:
    """A session-end summary with ``status`` (torch's helper always writes success)."""
    content = HParamsPluginData(
        session_end_info=SessionEndInfo(status=status), version=PLUGIN_DATA_VERSION
    )
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)])


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write null so that every JSON reader can parse the file."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
