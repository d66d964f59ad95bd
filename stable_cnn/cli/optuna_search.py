"""``hparams_search=optuna``: a Hydra sweeper of stable-cnn's own on a current Optuna
(>= 4), through its ask-and-tell interface. Hydra finds it through the
``hydra_plugins.stable_cnn_optuna`` package; conf/hparams_search/optuna.yaml selects it
(``hydra/sweeper: stable_optuna``) and names the search space.

The space is written as Hydra's sweeps are: ``interval(a, b)``, ``tag(log, interval(a,
b))``, ``choice(x, y)``, ``range(a, b, step)``; a plain value is fixed for every trial.
Each trial is one job of the launcher (its own folder, its own run); its return value,
the best validation accuracy, is told to the study. A job that fails is a failed trial
and the search goes on, up to ``max_failure_rate``. The study lives in ``storage`` under
``study_name``: rerunning the command continues it.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from stable_cnn.cli.optuna_space import (
    check_same_setting,
    check_same_space,
    grid_of,
    search_space,
)
from stable_cnn.cli.optuna_trials import (
    TrialPlan,
    TrialWorkers,
    end_of_launched,
    end_of_worker,
    hydra_value,
    run_side_by_side,
    tell,
    told,
)
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.studies.optuna_study import (
    PRUNER_OPTIONS,
    STALE_AFTER_HEARTBEATS,
    Heartbeats,
    fail_stale_trials,
    make_pruner,
    make_sampler,
    open_storage,
    summarise,
    write_study_files,
)

log = logging.getLogger("stable_cnn")

# What a trial's value depends on besides its parameters (a continued study must keep them)
SETTING_KEYS = ("model.name", "model.arch", "trainer.epochs")
CHOSEN_GROUPS = ("optimizer", "scheduler", "clipping", "amp", "ema", "experiment")
DATA_SETTING_KEYS = ("name", "limit_train", "limit_test", "val_size", "image_size")


@dataclass
class OptunaSearchConfig:
    """``hydra.sweeper.*`` of hparams_search=optuna."""

    _target_: str = "hydra_plugins.stable_cnn_optuna.OptunaSearch"
    direction: str = "maximize"  # maximize | minimize what each job returns
    study_name: str = "search"
    # An Optuna storage URL: sqlite:///..., postgresql://..., mysql://..., journal://PATH
    # (a journal file, many processes on one machine); null: in memory (lost at the end)
    storage: str | None = None
    n_trials: int = 20  # trials per invocation; rerun the command to add more
    # trials running at a time, each worker asking for the next as soon as its last ends:
    # worker processes on this machine (basic or joblib launcher), else one launch each
    n_jobs: int = 1
    max_failure_rate: float = 1.0  # stop once more than this share of the trials failed
    sampler: str = "tpe"  # tpe | random | cmaes | grid
    seed: int | None = None  # the sampler's; null: a continued study proposes new trials
    # median | percentile | successive_halving | hyperband | threshold | none: stops a
    # trial after an epoch whose validation accuracy is poor next to the other trials'
    pruner: str = "median"
    pruners: dict[str, dict[str, Any]] = field(
        default_factory=lambda: copy.deepcopy(PRUNER_OPTIONS)
    )  # each pruner's own arguments (Optuna's names)
    heartbeat_s: float = 30.0  # running trials are marked alive this often
    trial: int | None = None  # set by the search on each job: the trial it reports to
    params: dict[str, Any] = field(default_factory=dict)  # key: sweep expression


def register() -> None:
    ConfigStore.instance().store(
        group="hydra/sweeper", name="stable_optuna", node=OptunaSearchConfig, provider="stable_cnn"
    )


class OptunaSearchRun:
    """Asks the study for trials, runs each as a job, tells it how the job ended (the
    sweeper Hydra sees, in hydra_plugins/stable_cnn_optuna, hands on to this)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = OptunaSearchConfig(**settings)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.storage: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def open_study(self, arguments: list[str]) -> tuple[Any, dict[str, Any], dict[str, str], int]:
        """The study (created or continued), the searched and the fixed keys, and how
        many trials to run; one line where any of it cannot be. The study is None where
        a finished grid leaves nothing to run."""
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                "hparams_search=optuna needs Optuna: pip install 'stable-cnn[sweep]'"
            ) from None

        settings = self.settings
        stock = [f"{key}={value}" for key, value in self.stock_space().items()]
        space, fixed = search_space([*stock, *arguments])
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
        grid = grid_of(space) if settings.sampler == "grid" else None
        sampler = make_sampler(settings.sampler, settings.seed, grid)
        make_pruner(settings.pruner, settings.pruners)  # a mistyped option: before any trial
        if settings.heartbeat_s <= 0:
            raise ConfigError(
                f"hydra.sweeper.heartbeat_s={settings.heartbeat_s}: a running trial's heartbeat "
                "needs a positive interval in seconds (default 30)"
            )
        if str(settings.storage).startswith("sqlite") and not self.runs_trials_here():
            log.warning(
                "the study is a SQLite file, which jobs on other machines share badly "
                "(locks on network file systems): use hydra.sweeper.storage=postgresql://..."
            )
        if settings.n_jobs > 1 and settings.storage is None and self.runs_trials_here():
            raise ConfigError(
                f"hydra.sweeper.n_jobs={settings.n_jobs} runs trials in processes of their own, "
                "which share the study through its storage: set hydra.sweeper.storage (e.g. "
                "sqlite:///study.db)"
            )
        try:
            self.storage = open_storage(settings.storage, settings.study_name)
            study = optuna.create_study(
                study_name=settings.study_name,
                storage=self.storage,
                sampler=sampler,
                direction=settings.direction,
                load_if_exists=True,
            )
        except Exception as err:  # an older schema, a bad URL, a database that is away
            if not isinstance(err, RuntimeError | ValueError | ImportError) and (
                "sqlalchemy" not in type(err).__module__
            ):
                raise
            reason = " ".join(str(err).split())[:300]  # Optuna's own words say the fix
            reason = reason.replace("$STORAGE_URL", shown(settings.storage))
            raise ConfigError(
                f"hydra.sweeper.storage={shown(settings.storage)}: {reason}"
            ) from None
        check_same_setting(study, self.fixed_setting(space, fixed), settings.study_name)
        check_same_space(study, space, settings.study_name)
        if stale := fail_stale_trials(study, settings.heartbeat_s):
            log.warning(
                "trial(s) %s of study %s were left running by a worker that stopped (no "
                "heartbeat for %d of its intervals): marked failed",
                ", ".join(map(str, stale)),
                study.study_name,
                STALE_AFTER_HEARTBEATS,
            )
        trials = settings.n_trials
        if grid is not None:  # each point once, over every invocation
            size = math.prod(len(values) for values in grid.values())
            done = sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)
            trials = min(trials, max(0, size - done))
            if trials == 0:
                log.info("the grid's %d points have all run in study %s", size, study.study_name)
                return None, space, fixed, 0
        log.info(
            "Optuna %s: study %s (%d trials so far) in %s, %s sampler, %s pruner, %d trials to run",
            optuna.__version__,
            study.study_name,
            len(study.trials),
            shown(settings.storage),
            settings.sampler,
            settings.pruner,
            trials,
        )
        return study, space, fixed, trials

    def fixed_setting(self, space: dict[str, Any], fixed: dict[str, str]) -> dict[str, str]:
        """What a trial's value means beyond its parameters: the data, the model, the
        recipe's options and the length of training, where the search does not vary them."""
        keys = [*SETTING_KEYS, *(f"data.{key}" for key in DATA_SETTING_KEYS)]
        setting = {
            key: fixed.get(key, str(OmegaConf.select(self.config, key, default=None)))
            for key in keys
            if key not in space
        }
        for group in CHOSEN_GROUPS:  # optimizer=adamw, scheduler=onecycle...
            choice = OmegaConf.select(self.config, f"hydra.runtime.choices.{group}", default=None)
            if group not in space and choice is not None:
                setting[group] = fixed.get(group, str(choice))
        return setting

    def stock_space(self) -> dict[str, Any]:
        """hydra.sweeper.params without the keys this run's config does not have (the
        SmallCNN's dropout for model=resnet, say) or does not use (clipping.max_norm with
        clipping=none): the rest is searched."""
        kept = {}
        for key, expression in (self.settings.params or {}).items():
            group, _, leaf = key.rpartition(".")
            node = OmegaConf.select(self.config, group) if group else self.config
            if not isinstance(node, DictConfig) or leaf not in node:
                log.info("%s is not a key of this run's config: it leaves the search", key)
            elif node.get("name") == "none":  # clipping=none has a max_norm it never uses
                log.info("%s means nothing with %s=none: it leaves the search", key, group)
            else:
                kept[key] = expression
        return kept

    def runs_trials_here(self) -> bool:
        """Whether n_jobs > 1 runs worker processes on this machine (Hydra's basic or
        joblib launcher), rather than one launcher call per trial (submitit, SLURM)."""
        target = str(OmegaConf.select(self.config, "hydra.launcher._target_", default=""))
        return "BasicLauncher" in target or "joblib" in target.lower()

    def sweep(self, arguments: list[str]) -> None:
        try:
            study, space, fixed, trials = self.open_study(arguments)
        except UserError:  # refused before any trial: no empty invocation folder is left
            remove_if_empty(Path(self.config.hydra.sweep.dir))
            raise
        if study is None:  # nothing left to run (a finished grid)
            remove_if_empty(Path(self.config.hydra.sweep.dir))
            return
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # what this invocation ran, as Hydra's
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # basic sweeper records it
        plan = TrialPlan(trials, self.settings.max_failure_rate)
        slots = min(max(1, self.settings.n_jobs), trials)
        workers = None
        if slots > 1 and self.runs_trials_here():
            devices = int(fixed.get("trainer.devices", self.config.trainer.devices))
            workers = TrialWorkers(self.config, slots, devices)
        with Heartbeats(self.storage, self.settings.heartbeat_s) as heartbeats:
            if slots == 1:  # in this thread: Hydra's basic launcher runs the job right here
                self.run_slot(0, study, space, fixed, plan, heartbeats, workers)
            else:
                run_side_by_side(
                    slots,
                    lambda slot: self.run_slot(
                        slot, study, space, fixed, plan, heartbeats, workers
                    ),
                    plan,
                    None if workers is None else workers.signal_all,
                )
        self.write_summary(study)
        if plan.too_many_failed:
            raise ConfigError(
                f"{plan.failed} of {plan.ended} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.settings.max_failure_rate}: see their "
                f"failure.json files"
            )

    def run_slot(
        self,
        slot: int,
        study: Any,
        space: dict[str, Any],
        fixed: dict[str, str],
        plan: TrialPlan,
        heartbeats: Heartbeats,
        workers: TrialWorkers | None,
    ) -> None:
        """One worker's trials, one after another: ask for a trial as soon as the last
        ended, run it, tell the study how it ended."""
        import optuna

        while (trial := plan.next(lambda: study.ask(space))) is not None:
            study_id = self.storage.get_study_id_from_name(study.study_name)
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            heartbeats.add(trial_id)
            values = {key: hydra_value(value) for key, value in trial.params.items()}
            overrides = [f"{key}={value}" for key, value in {**values, **fixed}.items()]
            name = hydra_value(study.study_name)
            try:
                if workers is not None:
                    status, output = workers.run(slot, trial.number, overrides, name)
                    end = end_of_worker(self.run_folder_of(trial_id), status, output)
                else:  # the study's name as resolved here: a job's own data must not move it
                    job = (
                        *overrides,
                        f"hydra.sweeper.study_name={name}",
                        f"hydra.sweeper.trial={trial.number}",
                    )
                    launched = self.launcher.launch([job], trial.number)[0]
                    end = end_of_launched(launched)
            except BaseException:  # a launch that fails (or Ctrl-C) leaves no trial RUNNING
                told(study, trial, state=optuna.trial.TrialState.FAIL)
                plan.stop()
                raise
            finally:
                heartbeats.remove(trial_id)
            plan.ended_as(tell(study, trial, end))

    def run_folder_of(self, trial_id: int) -> str | None:
        """The run folder the trial's job recorded (None: it never got that far)."""
        return self.storage.get_trial_user_attrs(trial_id).get("run_folder")

    def write_summary(self, study: Any) -> None:
        """study.json and importances.png beside the sweep report (never an error)."""
        folder = OmegaConf.select(self.config, "hydra.callbacks.sweep.report_root", default=None)
        try:
            summary = summarise(study)
            write_study_files(summary, Path(str(folder or self.config.hydra.sweep.dir)))
        except Exception as err:  # a summary must never turn a finished search into a failure
            log.warning("no study summary: %s", err)
            return
        if summary.best_trial is not None:
            log.info(
                "Best value: %s, trial %d: %s",
                summary.best_value,
                summary.best_trial,
                " ".join(f"{k}={v}" for k, v in (summary.best_params or {}).items()),
            )


def shown(storage: str | None) -> str:
    """A storage URL for logs, its password masked (postgresql://user:***@host/db)."""
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", str(storage))


def remove_if_empty(folder: Path) -> None:
    """``folder`` and the empty folders above it up to the current one, where it holds
    nothing but Hydra's multirun.yaml (never a folder with anything else in it)."""
    if not folder.is_dir() or any(p.name != "multirun.yaml" for p in folder.iterdir()):
        return
    (folder / "multirun.yaml").unlink(missing_ok=True)
    here, folder = Path.cwd().resolve(), folder.resolve()
    while folder != here and folder.is_relative_to(here) and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
