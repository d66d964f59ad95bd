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

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from stable_cnn.errors import ConfigError, UserError

log = logging.getLogger("stable_cnn")

SAMPLERS = ("tpe", "random", "cmaes", "grid")
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
    storage: str | None = None  # an Optuna storage URL; null: in memory (lost at the end)
    n_trials: int = 20  # trials per invocation; rerun the command to add more
    n_jobs: int = 1  # trials launched at a time (with a launcher that runs them side by side)
    max_failure_rate: float = 1.0  # stop once more than this share of a batch failed
    sampler: str = "tpe"  # tpe | random | cmaes | grid
    seed: int | None = None  # the sampler's; null: a continued study proposes new trials
    params: dict[str, Any] = field(default_factory=dict)  # key: sweep expression


def register() -> None:
    ConfigStore.instance().store(
        group="hydra/sweeper", name="stable_optuna", node=OptunaSearchConfig, provider="stable_cnn"
    )


def distribution(override: Override) -> Any:
    """An Optuna distribution for a sweep expression, or the plain value of a fixed one."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    if override.is_range_sweep():  # Hydra's values: the stop excluded, any step
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        key = override.get_key_element()
        if len(values) < 2 or value.step <= 0:
            raise ConfigError(
                f"{key}={override.get_value_element_as_str()}: a range to search "
                f"needs two values or more, rising"
            )
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
        low, step = float(values[0]), float(value.step)
        high = round(low + (len(values) - 1) * step, 12)  # 0.9, not 0.8999999999999999
        return FloatDistribution(round(low, 12), high, step=step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(f"hydra.sweeper.params: {override.input_line} is no sweep Optuna can take")


def search_space(expressions: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The searched keys with their distributions, and the fixed keys with their values."""
    from optuna.distributions import BaseDistribution

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(expressions):
        made = distribution(override)
        key = override.get_key_element()
        if isinstance(made, BaseDistribution):  # the last word on a key wins, as in Hydra:
            space[key] = made  # the command line's over the stock space
            fixed.pop(key, None)
        else:
            fixed[key] = made
            space.pop(key, None)
    return space, fixed


def grid_of(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value of each key, for sampler=grid (choices and ranges only)."""
    from optuna.distributions import CategoricalDistribution

    grid = {}
    for key, made in space.items():
        if isinstance(made, CategoricalDistribution):
            grid[key] = list(made.choices)
        elif getattr(made, "step", None) is not None:
            count = round((made.high - made.low) / made.step) + 1
            grid[key] = [made.low + k * made.step for k in range(count)]
        else:
            raise ConfigError(
                f"hydra.sweeper.sampler=grid needs a finite set for {key}: use choice(...) or "
                f"range(...), not interval(...)"
            )
    return grid


def make_sampler(name: str, seed: int | None, space: dict[str, Any]) -> Any:
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(
            f"hydra.sweeper.sampler={name!r} is not known: use one of {', '.join(SAMPLERS)}"
        )
    if name == "grid":
        return optuna.samplers.GridSampler(grid_of(space), seed=seed)
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


class OptunaSearchRun:
    """Asks the study for trials, launches each as a job, tells it what the job returned
    (the sweeper Hydra sees, in hydra_plugins/stable_cnn_optuna, hands on to this)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = OptunaSearchConfig(**settings)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

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
        sampler = make_sampler(settings.sampler, settings.seed, space)
        try:
            study = optuna.create_study(
                study_name=settings.study_name,
                storage=settings.storage,
                sampler=sampler,
                direction=settings.direction,
                load_if_exists=True,
            )
        except (RuntimeError, ValueError) as err:  # an older Optuna's schema, a bad URL
            reason = " ".join(str(err).split())  # Optuna's own words say the fix
            raise ConfigError(
                f"hydra.sweeper.storage={shown(settings.storage)}: {reason}"
            ) from None
        check_same_setting(study, self.fixed_setting(space, fixed), settings.study_name)
        check_same_space(study, space, settings.study_name)
        trials = settings.n_trials
        if settings.sampler == "grid":  # each point once, over every invocation
            size = math.prod(len(values) for values in grid_of(space).values())
            done = sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)
            trials = min(trials, max(0, size - done))
            if trials == 0:
                log.info("the grid's %d points have all run in study %s", size, study.study_name)
                return None, space, fixed, 0
        log.info(
            "Optuna %s: study %s (%d trials so far) in %s, %s sampler, %d trials to run",
            optuna.__version__,
            study.study_name,
            len(study.trials),
            shown(settings.storage),
            settings.sampler,
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
        SmallCNN's dropout for model=resnet, say): the rest is searched."""
        kept = {}
        for key, expression in (self.settings.params or {}).items():
            group, _, leaf = key.rpartition(".")
            node = OmegaConf.select(self.config, group) if group else self.config
            if isinstance(node, DictConfig) and leaf in node:
                kept[key] = expression
            else:
                log.info("%s is not a key of this run's config: it leaves the search", key)
        return kept

    def sweep(self, arguments: list[str]) -> None:
        try:
            study, space, fixed, trials = self.open_study(arguments)
        except UserError:  # refused before any trial: no empty invocation folder is left
            remove_if_empty(Path(self.config.hydra.sweep.dir))
            raise
        if study is None:  # nothing left to run (a finished grid)
            remove_if_empty(Path(self.config.hydra.sweep.dir))
            return
        import optuna  # there: open_study found it

        settings = self.settings
        while trials > 0:
            batch = min(trials, max(1, settings.n_jobs))
            asked = [study.ask(space) for _ in range(batch)]
            overrides = [
                (  # the study's name as resolved here: a job's own data or model must not move it
                    *(f"{key}={value}" for key, value in {**trial.params, **fixed}.items()),
                    f"hydra.sweeper.study_name={study.study_name}",
                )
                for trial in asked
            ]
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException:  # a launch that fails (or Ctrl-C) leaves no trial RUNNING
                for trial in asked:
                    told(study, trial, state=optuna.trial.TrialState.FAIL)
                raise
            self.job_idx += len(returns)
            failed = sum(
                not tell(study, trial, job) for trial, job in zip(asked, returns, strict=True)
            )
            if failed / len(returns) > settings.max_failure_rate:
                raise ConfigError(
                    f"{failed} of {len(returns)} trials failed, more than "
                    f"hydra.sweeper.max_failure_rate={settings.max_failure_rate}: see their "
                    f"failure.json files"
                )
            trials -= batch
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if finished:
            log.info(
                "Best value: %s, trial %d: %s",
                study.best_value,
                study.best_trial.number,
                " ".join(f"{k}={v}" for k, v in study.best_params.items()),
            )


def shown(storage: str | None) -> str:
    """A storage URL for logs, its password masked (postgresql://user:***@host/db)."""
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", str(storage))


def check_same_space(study: Any, space: dict[str, Any], name: str) -> None:
    """One line where a continued study searched a key over another range or choice
    (Optuna cannot mix them in one study)."""
    from optuna.distributions import check_distribution_compatibility

    for trial in study.trials:
        for key, earlier in trial.distributions.items():
            if key in space:
                try:
                    check_distribution_compatibility(earlier, space[key])
                except ValueError:
                    raise ConfigError(
                        f"study {name} searched {key} as {earlier}, not {space[key]}: name "
                        f"another study with hydra.sweeper.study_name=..."
                    ) from None


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


def check_same_setting(study: Any, setting: dict[str, str], name: str) -> None:
    """A new study records ``setting``; a continued one refuses, in one line, a search
    whose values would mean something else (other data, another model, other epochs)."""
    recorded = study.user_attrs.get("setting")
    if recorded is None:
        study.set_user_attr("setting", setting)
        return
    differing = [key for key in setting if key in recorded and recorded[key] != setting[key]]
    if differing:
        shown = ", ".join(
            f"{key}={setting[key]} (the study's: {recorded[key]})" for key in differing[:3]
        )
        raise ConfigError(
            f"study {name} was started with other settings: {shown}; its trials would not "
            f"compare: name another study with hydra.sweeper.study_name=..."
        )


def tell(study: Any, trial: Any, job: Any) -> bool:
    """Tell ``study`` what ``job`` returned for ``trial``; False when the job failed."""
    import optuna

    try:
        value = float(job.return_value)  # raises the job's own error where it failed
    except Exception as err:  # a failed job is a failed trial: the search goes on
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("trial %d failed: %s", trial.number, reason)
        told(study, trial, state=optuna.trial.TrialState.FAIL)
        return False
    told(study, trial, value)
    return math.isfinite(value)


def told(study: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
    """``study.tell``, where the grid sampler's stop at its last point is no error."""
    try:
        study.tell(trial, *args, skip_if_finished=True, **kwargs)
    except RuntimeError as err:  # Study.stop() outside optimize(): the grid is done
        if "Study.stop" not in str(err):
            raise
