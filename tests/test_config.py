"""Every config option composes into working objects; every bad input is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stable_cnn.cli.conf import config_dir
from stable_cnn.config import AmpConfig
from stable_cnn.data.build import build_splits
from stable_cnn.errors import EXIT_BAD_INPUT, EXIT_FAILED, ConfigError
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import choose_precision
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from tests.conftest import TINY, compose_config, compose_run, run_cli

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{group}={option}"
        for group in ("optimizer", "scheduler", "clipping", "amp")
        for option in options(group)
    ],
)
def test_every_training_option_composes_and_builds(override: str):
    run = compose_run([*TINY, override])
    group, option = override.split("=")
    # tutorial_sgd and tutorial_cosine are SGD and cosine with the tutorial's values
    assert getattr(run, group).name == option.removeprefix("tutorial_")
    model = SmallCNN(width=run.model.width, dropout=run.model.dropout)
    optimizer = build_optimizer(model, run.optimizer)
    schedule = build_schedule(optimizer, run.scheduler, run.trainer.epochs, steps_per_epoch=5)
    for step in range(1, 6):
        optimizer.step()
        schedule.after_optimizer_step(step)
    schedule.after_epoch(1, val_acc=50.0)
    assert optimizer.param_groups[0]["lr"] >= 0
    precision = choose_precision(run.amp.name, torch.device("cpu"))
    assert precision.name in ("fp32", "fp16", "bf16")


@pytest.mark.parametrize("option", [o for o in options("model") if o != "custom"])
def test_every_model_option_composes_and_builds_for_the_data(option: str):
    """The data's channels, classes and size reach every model (custom: tests/test_models.py)."""
    from stable_cnn.data.splits import DatasetInfo
    from stable_cnn.models.build import build_model
    from stable_cnn.training.build import model_config

    run = compose_run([*(a for a in TINY if not a.startswith("model.")), f"model={option}"])
    info = DatasetInfo("synthetic", 1, 7, 28, tuple(f"c{k}" for k in range(7)))
    model = build_model(model_config(run, info))
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 7)


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_composes(option: str):
    needs = {"image_folder": ["data.root=/some/images"], "custom": ["data._target_=my.load"]}
    run = compose_run([f"data={option}", *needs.get(option, [])])
    assert run.data.name == option
    if option not in ("custom", "image_folder"):  # these take their statistics from the data
        assert len(run.data.mean) == len(run.data.std) == run.data.in_channels


def test_synthetic_data_builds_batches():
    run = compose_run(TINY)
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    images, labels = next(iter(splits.train))
    assert images.shape == (64, 1, 28, 28) and labels.shape == (64,)


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_preset_composes(option: str):
    run = compose_run([f"experiment={option}"])
    assert run.trainer.epochs >= 1 and run.data.batch_size >= 1
    assert run.model.name in ("small_cnn", "resnet")
    if run.model.name == "small_cnn":
        assert run.model.width >= 8


def test_experiment_tutorial_keeps_the_tutorials_recipe_while_the_defaults_moved_on():
    tutorial = compose_run(["experiment=tutorial"])
    assert tutorial.model.width == 64 and tutorial.trainer.epochs == 30
    assert (tutorial.model.dropout, tutorial.model.head_dropout) == (0.3, 0.5)
    assert tutorial.optimizer.name == "sgd" and tutorial.optimizer.lr == 0.05
    assert not tutorial.optimizer.nesterov
    assert (tutorial.scheduler.name, tutorial.scheduler.interval) == ("cosine", "epoch")
    assert tutorial.scheduler.warmup_epochs == 0 and tutorial.trainer.label_smoothing == 0
    assert (tutorial.clipping.name, tutorial.clipping.max_norm) == ("norm", 1.0)
    assert tutorial.amp.name == "auto" and tutorial.ema.name == "off"
    # the defaults are the measured recipe (README: why the defaults differ)
    default = compose_run([])
    assert (default.model.dropout, default.model.head_dropout) == (0.0, 0.1)
    assert (default.optimizer.lr, default.optimizer.nesterov) == (0.1, True)
    assert (default.scheduler.interval, default.scheduler.warmup_epochs) == ("step", 0.3)
    assert default.trainer.label_smoothing == 0.1


@pytest.mark.parametrize("choice", ["optimizer=adamw", "scheduler=plateau", "scheduler=onecycle"])
def test_experiment_tutorial_takes_another_optimizer_or_schedule(choice: str):
    run = compose_run(["experiment=tutorial", choice])
    group, option = choice.split("=")
    assert getattr(run, group).name == option and run.model.dropout == 0.3


def test_data_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("STABLE_CNN_DATA", "/datasets")
    assert compose_config([]).data.root == "/datasets"
    monkeypatch.delenv("STABLE_CNN_DATA")
    assert compose_config([]).data.root == "./data"


def test_the_schemas_option_lists_match_the_config_folders():
    """optimizer.name and scheduler.name are checked against these lists."""
    from stable_cnn.config import OPTIMIZER_OPTIONS, SCHEDULER_OPTIONS
    from tests.conftest import REPO

    for group, options in (("optimizer", OPTIMIZER_OPTIONS), ("scheduler", SCHEDULER_OPTIONS)):
        assert sorted(options) == sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def test_amp_off_is_the_string_off_not_yaml_false():
    assert compose_run(["amp=off"]).amp == AmpConfig("off")


# Each bad input: the overrides, and text the error must contain (key, value, the fix).
# Hydra's own mistakes (its report, rewritten by cli/hydra_errors.py) and two of ours go
# through the CLI as a user meets them; the rest of ours come from the same range checks
# (config/*.py) on the way to the same one line, so they are checked where they are made.
CLI_BAD_INPUTS = {
    "unknown group option": (
        ["optimizer=foo"],
        ["optimizer=foo", "adamw, muon, sgd, tutorial_sgd"],
    ),
    "unknown amp option": (["amp=fp8"], ["amp=fp8", "bf16"]),
    "unknown key": (["optimizer.lrr=0.1"], ["optimizer.lrr", "did you mean optimizer.lr?"]),
    "unparsable override": (["optimizer.lr=["], ["'optimizer.lr=['", "key=value"]),
    "wrong type float": (["optimizer.momentum=abc"], ["optimizer.momentum", "'abc'", "Float"]),
    "wrong type int": (["trainer.epochs=1.5"], ["trainer.epochs", "1.5", "Integer"]),
    "lr <= 0": (["optimizer.lr=0"], ["optimizer.lr=0", "must be a number > 0 or auto"]),
    "image_folder without root": (["data=image_folder"], ["data.root", "required"]),
}
RANGE_CHECKS = {
    "optimizer.name": (
        ["optimizer.name=foo"],
        ["optimizer.name='foo'", "optimizer=<option>", "adamw, muon, sgd, tutorial_sgd"],
    ),
    "scheduler.name": (
        ["scheduler.name=foo"],
        ["scheduler.name='foo'", "scheduler=<option>", "cosine, none, onecycle"],
    ),
    "clipping.name": (["clipping.name=foo"], ["clipping.name='foo'", "norm, value, none"]),
    "dropout >= 1": (["model.dropout=1.0"], ["model.dropout=1.0", "[0, 1)"]),
    "negative head dropout": (["model.head_dropout=-0.1"], ["model.head_dropout=-0.1"]),
    "epochs < 1": (["trainer.epochs=0"], ["trainer.epochs=0", ">= 1"]),
    "max_norm <= 0": (["clipping.max_norm=0"], ["clipping.max_norm=0.0", "> 0"]),
    "max_value <= 0": (["clipping=value", "clipping.max_value=-1"], ["clipping.max_value=-1"]),
    "unknown device": (["trainer.device=tpu"], ["trainer.device='tpu'", "cuda:N"]),
    "bad interval": (["scheduler.interval=hourly"], ["scheduler.interval='hourly'", "step"]),
    "per-epoch with the default warm-up": (
        ["scheduler.interval=epoch"],
        ["scheduler.warmup_epochs=0.3", "scheduler.warmup_epochs=0"],
    ),
    "limit_train=0": (["data.limit_train=0"], ["data.limit_train=0", ">= 1"]),
    "lr neither a number nor auto": (["optimizer.lr=fast"], ["optimizer.lr='fast'", "or auto"]),
    "mean per channel": (["data=cifar10", "data.mean=[0.5]"], ["data.mean", "per input channel"]),
    "negative mixup": (["data.mixup_alpha=-1"], ["data.mixup_alpha=-1.0", "0 = off"]),
    "mix_prob > 1": (["data.mix_prob=2"], ["data.mix_prob=2.0", "[0, 1]"]),
    "negative translate": (["data.tta_translate=-1"], ["data.tta_translate=-1", "pixels"]),
    "muon's auxiliary": (
        ["optimizer=muon", "optimizer.auxiliary=lamb"],
        ["optimizer.auxiliary='lamb'", "sgd or adamw"],
    ),
    "muon's adjust_lr": (
        ["optimizer=muon", "optimizer.adjust_lr=foo"],
        ["optimizer.adjust_lr='foo'", "match_rms_adamw"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_BAD_INPUTS, ids=list(CLI_BAD_INPUTS))
def test_bad_config_stops_before_reading_data(case: str, tmp_path: Path):
    overrides, expected = CLI_BAD_INPUTS[case]
    data_root = {"STABLE_CNN_DATA": str(tmp_path / "data")}
    done = run_cli([*overrides, "hydra.run.dir=run"], tmp_path, env=data_root)
    output = done.stdout + done.stderr
    assert done.returncode == 2
    for text in expected:
        assert text in output, f"{text!r} missing from:\n{output}"
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: " in lines[0], f"one line, Hydra's or ours:\n{output}"
    assert not (tmp_path / "data").exists(), "no data was read or downloaded"
    assert list(tmp_path.iterdir()) == [], "a refused command leaves no run folder behind"


@pytest.mark.parametrize("case", RANGE_CHECKS, ids=list(RANGE_CHECKS))
def test_out_of_range_values_are_one_line_naming_key_value_and_fix(case: str):
    overrides, expected = RANGE_CHECKS[case]
    with pytest.raises(ConfigError) as refused:
        compose_run(overrides)
    message = str(refused.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, f"{text!r} missing from: {message}"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_one_line(tmp_path: Path):
    done = run_cli([*TINY, "trainer.device=cuda", "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 2
    assert "trainer.device='cuda'" in done.stdout and "trainer.device=cpu" in done.stdout


BAD_DATA = {
    "missing dataset offline": (
        ["data=mnist", "data.download=false"],
        ["MNIST is not in", "data.download=true"],
    ),
    "batch larger than data": (
        ["data.limit_train=10", "data.batch_size=32"],
        ["data.batch_size=32", "10 training images", "(to 10 at most) or raise data.limit_train"],
    ),
    "val_size larger than data": (["data.val_size=10000"], ["data.val_size=10000"]),
    "image folder without images": (
        ["data=image_folder", "data.root=."],
        ["train does not exist", "one subfolder of images per class"],
    ),
    "diverging loss": (
        ["optimizer.lr=1e6", "clipping=none", "amp=off", "data.limit_train=128"],
        ["became nan", "optimizer.lr"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_one_clear_error(case: str, tmp_path: Path):
    overrides, expected = BAD_DATA[case]
    args = [*TINY, *overrides, "hydra.run.dir=run"]
    done = run_cli(args, tmp_path, env={"STABLE_CNN_DATA": str(tmp_path / "data")})
    output = done.stdout + done.stderr
    assert done.returncode == (EXIT_FAILED if case == "diverging loss" else EXIT_BAD_INPUT), output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(text in errors[0] for text in expected), output
    assert "Traceback" not in output
    if case != "diverging loss":  # refused before training: nothing is left behind
        assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    else:  # a run that trained and diverged keeps its record
        assert (tmp_path / "run" / "failure.json").exists()


@pytest.mark.slow
def test_an_image_folder_too_small_for_a_batch_and_without_test_folder(tmp_path: Path):
    """The messages say what happened: no data.limit_train was set; val/ is the test set
    because there is no test/ folder (not because of data.val_size)."""
    from tests.test_data import write_image_folder

    write_image_folder(tmp_path / "images", {"train": {"a": 40, "b": 41}, "val": {"a": 5, "b": 4}})
    args = [
        "data=image_folder",
        f"data.root={tmp_path / 'images'}",
        "model.width=4",
        "trainer.epochs=1",
        "data.image_size=8",
        "hydra.run.dir=run",
    ]
    done = run_cli(args, tmp_path)
    assert done.returncode == 2
    assert (
        "data.batch_size=128 is larger than the 81 training images: lower data.batch_size "
        "(to 81 at most)" in done.stdout
    )
    assert "limit_train" not in done.stdout
    done = run_cli([*args, "data.batch_size=16", "hydra.run.dir=run2"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"{tmp_path / 'images'} has no test/ folder: val/ is both the validation and the "
        "test set" in done.stdout
    )
    assert "data.val_size=0)" not in done.stdout
