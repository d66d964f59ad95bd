"""logger=wandb: one Weights & Biases run per stable-cnn run, its files in the run
folder's wandb/.

Project ``logger.project`` (else ``logger.experiment``, else the experiment preset's
name), team ``logger.entity``, mode ``logger.mode`` (else ``$WANDB_MODE``, else online).
The run gets the composed config, TensorBoard's scalars under their names and steps
(sent in order when a checkpoint covers them; W&B takes a step only once, so what comes
at a step already sent, the test, goes to the run's summary), the figures, config and
results.json, and with ``logger.log_checkpoint`` best.pt as a model artifact. Its id is
saved in the checkpoints: a resume continues it (``resume="must"``). A sweep's jobs are
one run each, grouped by the sweep's folder, each finished at its job's end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from stable_cnn.config.logger import LoggerConfig
from stable_cnn.errors import ConfigError
from stable_cnn.training.trackers import ENDED_FOR_GOOD, RunLabels, one_line

log = logging.getLogger("stable_cnn")

TAG_LENGTH = 64  # W&B's limit for a tag


def has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (where wandb login puts it) for the
    W&B host."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    """A stable-cnn run's W&B run (rank 0's store)."""

    def __init__(
        self, logger: LoggerConfig, labels: RunLabels, run_id: str | None, resume_step: int = 0
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "logger=wandb needs the wandb package: pip install 'stable-cnn[wandb]' "
                "(or pip install wandb)"
            ) from None
        self.wandb, self.labels, self.log_checkpoint = wandb, labels, logger.log_checkpoint
        mode = logger.mode or os.environ.get("WANDB_MODE") or "online"
        if mode == "online" and not has_credentials():  # else wandb asks in a terminal
            raise ConfigError(
                "logger=wandb: no W&B login on this machine: run wandb login (or set "
                "WANDB_API_KEY), or set logger.mode=offline (upload later with wandb sync)"
            )
        tags = [f"{key}={value}"[:TAG_LENGTH] for key, value in labels.varied.items()]
        settings = wandb.Settings(console="off")  # train.log is saved instead (close)
        # the same run where W&B has it; a new one of that id where it does not (an
        # offline run not synced yet)
        resume = {} if run_id is None else {"id": run_id, "resume": "allow"}
        project = os.environ.get("WANDB_PROJECT") or logger.experiment or labels.experiment
        try:
            self.run = wandb.init(
                project=logger.project or project,
                entity=logger.entity,
                mode=mode,
                dir=str(labels.folder),
                name=labels.name,
                group=None if labels.sweep is None else "/".join(Path(labels.sweep).parts[-2:]),
                config=labels.params,
                tags=tags,
                settings=settings,
                **resume,
            )
        except Exception as err:  # not logged in, no network, an id the project lacks
            raise ConfigError(
                f"logger=wandb did not start a run ({one_line(err)}): run wandb login, or set "
                f"logger.mode=offline (upload later with wandb sync)"
            ) from None
        self.run_id: str | None = None if mode == "disabled" else self.run.id
        self.pending: dict[int, dict[str, Any]] = {}  # step -> values logged since the commit
        self.sent_step = resume_step if run_id is not None else -1  # the last step W&B has
        try:
            self._save([".hydra/config.yaml", ".hydra/overrides.yaml"])
        except BaseException:
            self.run.finish(exit_code=1)
            raise
        log.info("W&B run %s (%s, project %s)", self.run_id, mode, self.run.project)

    def log_scalars(self, global_step: int, scalars: dict[str, float]) -> None:
        values = {tag: value for tag, value in scalars.items() if value is not None}
        if global_step <= self.sent_step:  # the test's, at the last epoch's step
            self.run.summary.update(values)
        else:
            self.pending.setdefault(global_step, {}).update(values)

    def log_figure(self, global_step: int, tag: str, figure: Any) -> None:
        image = self.wandb.Image(figure)  # drawn now: the caller closes the figure
        self.pending.setdefault(max(global_step, self.sent_step + 1), {})[tag] = image

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass  # the epoch's scalars came through log_scalars

    def log_results(self, results: dict[str, Any]) -> None:
        self.run.summary.update(
            {key: value for key, value in results.items() if isinstance(value, int | float)}
        )
        self._save(["results.json"])
        best = self.labels.folder / "checkpoints" / "best.pt"
        if self.log_checkpoint and best.is_file():
            artifact = self.wandb.Artifact(f"model-{self.run_id}", type="model")
            artifact.add_file(str(best))
            self.run.log_artifact(artifact, aliases=["best"])

    def commit(self) -> None:
        for step in sorted(self.pending):
            self.run.log(self.pending[step], step=step)
            self.sent_step = step
        self.pending = {}

    def close(self, status: str) -> None:
        if status not in ENDED_FOR_GOOD:  # no checkpoint covers them: the resume logs them
            self.pending = {}
        try:
            self.commit()
            self._save(["train.log"])
            self.run.summary["ended"] = status
            if status == "interrupted":  # to be resumed: W&B shows it as preempted
                self.run.mark_preempting()
        finally:
            self.run.finish(exit_code=0 if status == "finished" else 1)

    def _save(self, names: list[str]) -> None:
        for name in names:
            path = self.labels.folder / name
            if path.is_file():
                self.run.save(str(path), base_path=str(self.labels.folder), policy="now")
