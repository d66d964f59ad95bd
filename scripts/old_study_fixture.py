"""Writes tests/fixtures/old_study/study.db: a study as Optuna 2.10.1 (what the sweep extra
installed through hydra-optuna-sweeper 1.3, before stable-cnn's own sweeper) left it, in
its schema, with the old stock search space and the old default study name ``search``.
Run it with an Optuna 2.10 interpreter, never today's:

    python3 -m venv /tmp/optuna210
    /tmp/optuna210/bin/pip install optuna==2.10.1 'sqlalchemy<2' 'alembic<1.14' 'numpy<2'
    /tmp/optuna210/bin/python scripts/old_study_fixture.py tests/fixtures/old_study/study.db

The trials' values are stand-ins (the fixture is about the storage, not the numbers).
"""

import sys
from pathlib import Path

import optuna
from optuna.distributions import (
    CategoricalDistribution,
    LogUniformDistribution,
    UniformDistribution,
)

assert optuna.__version__.startswith("2.10"), "run this with Optuna 2.10"
path = Path(sys.argv[1])
path.unlink(missing_ok=True)
study = optuna.create_study(
    study_name="search",
    storage=f"sqlite:///{path}",
    direction="maximize",
    sampler=optuna.samplers.TPESampler(seed=0),
)
space = {  # conf/hparams_search/optuna.yaml at a288a66
    "optimizer.lr": LogUniformDistribution(0.005, 0.3),
    "optimizer.weight_decay": LogUniformDistribution(1e-5, 1e-2),
    "model.dropout": UniformDistribution(0.0, 0.4),
    "model.head_dropout": UniformDistribution(0.0, 0.6),
    "clipping.max_norm": LogUniformDistribution(0.25, 10.0),
    "model.width": CategoricalDistribution([8, 16, 32]),
}
for value in (61.5, 74.25, 70.0):
    trial = study.ask(space)
    study.tell(trial, value)
print(f"{path}: study 'search' by Optuna {optuna.__version__}, {len(study.trials)} trials")
