"""stable-cnn's Optuna sweeper where Hydra looks for plugins; the work is done in
stable_cnn/cli/optuna_search.py."""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from stable_cnn.cli.optuna_search import OptunaSearchRun, register

register()


class OptunaSearch(Sweeper):
    """hydra/sweeper=stable_optuna (hparams_search=optuna)."""

    def __init__(self, **settings: Any) -> None:
        self.search = OptunaSearchRun(settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.search.sweep(arguments)
