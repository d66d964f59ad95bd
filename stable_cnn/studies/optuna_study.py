"""An Optuna study as stable-cnn's searches keep it, in plain arguments: the storage a URL
names, the sampler and pruner a search names, the heartbeat of each running trial (and
the trials a stopped worker left RUNNING), a job's report to its own trial after each
epoch, and what the study found (its best trial and what mattered most).

The sweeper (stable_cnn/cli/optuna_search.py) asks and tells; a job only reports. Optuna
is imported where it is used: the search is an optional extra (``stable-cnn[sweep]``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_cnn.errors import ConfigError
from stable_cnn.system.atomic import atomic_write
from stable_cnn.system.plotting import pyplot

log = logging.getLogger("stable_cnn")

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")
# Each pruner's own arguments (Optuna's names); a search changes one with
# hydra.sweeper.pruners.median.n_startup_trials=3. An epoch is one step.
PRUNER_OPTIONS: dict[str, dict[str, Any]] = {
    "median": {"n_startup_trials": 5, "n_warmup_steps": 0, "interval_steps": 1, "n_min_trials": 1},
    "percentile": {
        "percentile": 25.0,
        "n_startup_trials": 5,
        "n_warmup_steps": 0,
        "interval_steps": 1,
        "n_min_trials": 1,
    },
    "successive_halving": {
        "min_resource": 1,
        "reduction_factor": 3,
        "min_early_stopping_rate": 0,
        "bootstrap_count": 0,
    },
    "hyperband": {
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
        "bootstrap_count": 0,
    },
    "threshold": {"lower": None, "upper": None, "n_warmup_steps": 0, "interval_steps": 1},
    "none": {},
}
JOURNAL = "journal://"  # journal://PATH: Optuna's journal file, no database server
HEARTBEAT = "stable_cnn:heartbeat"  # a running trial's last sign of life (time.time())
HEARTBEAT_EVERY = "stable_cnn:heartbeat_s"  # how often its search marks it alive
STALE_AFTER_HEARTBEATS = 4  # a running trial without a heartbeat this long was left behind
STUDY_FILE = "study.json"  # what the study found, beside the sweep report
IMPORTANCES_PLOT = "importances.png"
SCHEMA_ATTEMPTS = 5  # tries to open a database whose tables another search is creating
# Studies kept in this process (storage null): a job run by Hydra's basic launcher, in
# this same process, reports to its trial through them.
IN_MEMORY: dict[str, Any] = {}


def open_storage(url: str | None, study_name: str) -> Any:
    """The storage ``url`` names: ``sqlite:///...``, ``postgresql://...`` or
    ``mysql://...`` (Optuna's RDBStorage), ``journal://PATH`` (a journal file that many
    processes on one machine share without a server), or null (this process's memory)."""
    import optuna

    if url is None:
        return IN_MEMORY.setdefault(study_name, optuna.storages.InMemoryStorage())
    if url.startswith("postgres://"):  # Heroku's and others' spelling
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL) :]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    # SQLite: writers wait for each other (parallel trials, concurrent invocations)
    # instead of failing at once with "database is locked"
    options = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    url = with_postgres_driver(url)
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True, **options})
        except Exception as err:  # searches started at once all create the tables: one wins
            if not lost_schema_race(err) or attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def lost_schema_race(err: Exception) -> bool:
    """Another process created the study tables (or held the SQLite file) first."""
    words = str(err).lower()
    return type(err).__name__ in ("IntegrityError", "ProgrammingError", "OperationalError") and (
        "unique" in words or "already exists" in words or "locked" in words
    )


def with_postgres_driver(url: str) -> str:
    """``postgresql://`` through the driver this machine has: SQLAlchemy's default,
    psycopg2, else psycopg 3 (what ``stable-cnn[postgres]`` installs)."""
    import importlib.util

    if not url.startswith("postgresql://") or importlib.util.find_spec("psycopg2"):
        return url
    if importlib.util.find_spec("psycopg"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    raise ConfigError(
        "hydra.sweeper.storage=postgresql://... needs a PostgreSQL driver: "
        "pip install 'stable-cnn[postgres]'"
    )


def make_sampler(name: str, seed: int | None, grid: dict[str, list[Any]] | None) -> Any:
    """Optuna's sampler by name (``grid`` needs every value of every searched key)."""
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(
            f"hydra.sweeper.sampler={name!r} is not known: use one of {', '.join(SAMPLERS)}"
        )
    if name == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CMA-ES sampler needs it)
        except ImportError:
            raise ConfigError(
                "hydra.sweeper.sampler=cmaes needs the cmaes package: pip install cmaes"
            ) from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, options: dict[str, dict[str, Any]]) -> Any:
    """Optuna's pruner by name, with its arguments from ``options[name]`` (over
    PRUNER_OPTIONS); one line where Optuna refuses them."""
    from optuna import pruners

    classes = {
        "median": pruners.MedianPruner,
        "percentile": pruners.PercentilePruner,
        "successive_halving": pruners.SuccessiveHalvingPruner,
        "hyperband": pruners.HyperbandPruner,
        "threshold": pruners.ThresholdPruner,
        "none": pruners.NopPruner,
    }
    if name not in classes:
        raise ConfigError(
            f"hydra.sweeper.pruner={name!r} is not known: use one of {', '.join(PRUNERS)}"
        )
    arguments = {**PRUNER_OPTIONS[name], **(options.get(name) or {})}
    if name == "threshold":
        arguments = {key: value for key, value in arguments.items() if value is not None}
    try:
        return classes[name](**arguments)
    except (TypeError, ValueError) as err:
        given = " ".join(f"{key}={value}" for key, value in arguments.items())
        raise ConfigError(
            f"hydra.sweeper.pruners.{name} ({given or 'no arguments'}): {err}"
        ) from None


@dataclass
class Pruned:
    """What a job that its trial's pruner stopped returns to the sweeper."""

    reason: str  # e.g. "after epoch 2 (val_acc 41.20%)"


class TrialReport:
    """A job's side of its trial: after each epoch, the validation accuracy goes to the
    trial (found by its number), and the study's pruner says whether to stop. Only the
    process that reports (rank 0) opens one."""

    def __init__(self, storage: str | None, study_name: str, number: int, pruner: Any) -> None:
        import optuna

        opened = open_storage(storage, study_name)
        self.study = optuna.load_study(study_name=study_name, storage=opened, pruner=pruner)
        study_id = opened.get_study_id_from_name(study_name)
        trial_id = opened.get_trial_id_from_study_id_trial_number(study_id, number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.number = number
        self.reporting = True

    def record_folder(self, folder: Path) -> None:
        """Where the trial's run is (the sweeper reads its outcome there)."""
        try:
            self.trial.set_user_attr("run_folder", str(folder.resolve()))
        except Exception as err:  # the study's database is away, or the trial was ended
            log.warning("trial %d: its run folder is not recorded (%s)", self.number, err)

    def should_stop(self, epoch: int, value: float, last: bool) -> bool:
        """Report ``value`` for ``epoch``; True where the pruner stops the trial here
        (never after the last epoch: there is nothing left to save)."""
        if not self.reporting:
            return False
        try:
            self.trial.report(value, epoch)
            return not last and self.trial.should_prune()
        except Exception as err:  # ended by another search, the database away: train on
            log.warning(
                "trial %d: epochs no longer reported, never pruned (%s)",
                self.number,
                " ".join(str(err).split())[:200],
            )
            self.reporting = False
            return False


class FollowerReport:
    """The other processes of a trial's run (DDP): rank 0 reports and decides; they
    follow what it broadcasts."""

    def should_stop(self, epoch: int, value: float, last: bool) -> bool:
        return False

    def record_folder(self, folder: Path) -> None:
        pass


class Heartbeats:
    """A thread that marks each running trial alive every ``every_s`` seconds, so that
    the trials of a worker that was killed can be told from those still running."""

    def __init__(self, storage: Any, every_s: float) -> None:
        self.storage, self.every_s = storage, every_s
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="trial-heartbeats", daemon=True)

    def __enter__(self) -> Heartbeats:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def add(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, HEARTBEAT_EVERY, self.every_s)
        self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        with self.lock:
            self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every_s):
            with self.lock:
                running = list(self.trial_ids)
            for trial_id in running:
                try:
                    self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
                except Exception as err:  # finished meanwhile, or the database is away
                    log.debug("no heartbeat for trial id %d: %s", trial_id, err)


def fail_stale_trials(study: Any, heartbeat_s: float) -> list[int]:
    """Mark FAIL the RUNNING trials whose search has not marked them alive for 4 of its
    heartbeats (its own interval; ``heartbeat_s`` for trials without one): a worker that
    was killed. Returns their numbers."""
    import optuna

    now = time.time()
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        every = float(trial.system_attrs.get(HEARTBEAT_EVERY, heartbeat_s))
        last_beat = float(trial.system_attrs.get(HEARTBEAT, started))
        if now - last_beat > STALE_AFTER_HEARTBEATS * every:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            stale.append(trial.number)
    return stale


@dataclass
class StudySummary:
    """What a study found, for the sweep report (study.json beside it)."""

    study_name: str
    direction: str
    states: dict[str, int]  # trials per state: COMPLETE, PRUNED, FAIL, RUNNING
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] | None = None
    best_run_folder: str | None = None
    importances: dict[str, float] | None = None  # parameter -> share of the variance
    importances_note: str = ""


def summarise(study: Any) -> StudySummary:
    import optuna

    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    summary = StudySummary(study.study_name, study.direction.name.lower(), states)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return summary
    best = study.best_trial
    summary.best_trial, summary.best_value = best.number, best.value
    summary.best_params = best.params
    summary.best_run_folder = best.user_attrs.get("run_folder")
    summary.importances, summary.importances_note = importances(study, len(complete))
    return summary


MIN_TRIALS_FOR_IMPORTANCES = 4


def importances(study: Any, complete: int) -> tuple[dict[str, float] | None, str]:
    """Each parameter's importance (Optuna's PED-ANOVA evaluator: fast, no extra
    packages), or None and why not."""
    import optuna

    if complete < MIN_TRIALS_FOR_IMPORTANCES:
        return None, f"importances need {MIN_TRIALS_FOR_IMPORTANCES} finished trials or more"
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError, ImportError) as err:  # one value per key, say
        return None, f"no importances: {str(err).splitlines()[0]}"
    return {key: float(value) for key, value in found.items()}, "PED-ANOVA"


def write_study_files(summary: StudySummary, folder: Path) -> list[Path]:
    """study.json (read by the sweep report) and importances.png, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / STUDY_FILE) as out:
        out.write((json.dumps(summary.__dict__, indent=2, default=str) + "\n").encode())
    written = [folder / STUDY_FILE]
    if summary.importances and plot_importances(summary.importances, folder / IMPORTANCES_PLOT):
        written.append(folder / IMPORTANCES_PLOT)
    else:
        (folder / IMPORTANCES_PLOT).unlink(missing_ok=True)  # an earlier one: no longer true
    return written


def plot_importances(found: dict[str, float], path: Path) -> bool:
    """A horizontal bar per parameter, the most important on top; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(found)[::-1]
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    axes.barh(names, [found[name] for name in names], color="tab:blue")
    axes.set_xlabel("importance (share, PED-ANOVA)")
    axes.set_title("what the search's value depended on")
    axes.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
