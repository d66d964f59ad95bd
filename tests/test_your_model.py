"""Your model, your data: torchvision's ResNets, timm's models and a model class of your
own train, resume exactly, evaluate, export (onnxruntime agrees) and predict, driven
through the CLI on a small real subset; a dataset class of your own, in memory and
through DataLoader workers; gradient accumulation equals the large batch; what belongs
to the SmallCNN is refused for the others."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from stable_cnn.errors import EXIT_FAILED
from tests.conftest import REPO, TINY, compose_run, run_cli
from tests.test_export import command
from tests.test_resume import assert_same_run, stop_in_second_epoch

pytestmark = pytest.mark.slow

# A model module the package has never seen, written where only PYTHONPATH finds it.
MY_MODEL = '''
import os
from pathlib import Path

import torch
from torch import nn

if os.environ.get("MY_CODE_IMPORTED"):  # a trace of every import, for the trust tests
    Path(os.environ["MY_CODE_IMPORTED"]).touch()


class PlainNet(nn.Module):
    """Two convolutions, no BatchNorm: a user's own network."""

    def __init__(self, in_channels, num_classes, image_size, hidden=16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))

    def forward(self, images):
        return self.body(images)


class CrashesOnRank(PlainNet):
    """PlainNet with a bug that shows on one process alone: not a mistake in the input."""

    def __init__(self, in_channels, num_classes, image_size, crash_on_rank=1):
        super().__init__(in_channels, num_classes, image_size)
        self.crashes = int(os.environ.get("LOCAL_RANK", "0")) == crash_on_rank

    def forward(self, images):
        if self.crashes and self.training and torch.is_grad_enabled():  # in a training step
            raise ZeroDivisionError("a bug in my forward")
        return super().forward(images)
'''


# A dataset module of a user's: the first Fashion-MNIST images behind a class of its own,
# as PIL images or (as_tensors) float tensors in [0, 1], with named classes.
MY_DATA = """
import os
from pathlib import Path

from torchvision import datasets, transforms

if os.environ.get("MY_CODE_IMPORTED"):  # a trace of every import, for the trust tests
    Path(os.environ["MY_CODE_IMPORTED"]).touch()


class Clothes:
    def __init__(self, folder, train, count, as_tensors):
        to_tensor = transforms.ToTensor() if as_tensors else None
        self.source = datasets.FashionMNIST(folder, train=train, transform=to_tensor)
        self.count, self.classes = count, self.source.classes

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.source[index]


def load(folder, count=640, as_tensors=False):
    return Clothes(folder, True, count, as_tensors), Clothes(folder, False, 128, as_tensors)


def normalised(folder):
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.3], [0.35])])
    return (datasets.FashionMNIST(folder, train=True, transform=normalise),
            datasets.FashionMNIST(folder, train=False, transform=normalise))
"""


def small_real(root: Path, images: int = 512) -> list[str]:
    """``images`` real Fashion-MNIST training images, half as many to validate and to
    test, with the figures every epoch: an epoch in seconds."""
    return [
        f"data.root={root}",
        f"data.limit_train={images}",
        f"data.limit_test={images // 2}",
        f"data.val_size={images // 2}",
        "data.batch_size=64",
        "trainer.progress_bar=false",
        "diagnostics.figures_every_n_epochs=1",
    ]


@pytest.fixture(scope="module")
def my_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mine")
    (folder / "my_models.py").write_text(MY_MODEL)
    (folder / "my_data.py").write_text(MY_DATA)
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{REPO}"}


def train(args: list[str], run_dir: Path, env: dict[str, str] | None = None) -> str:
    done = run_cli([*args, f"hydra.run.dir={run_dir}"], run_dir.parent, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def exports_and_predicts(run_dir: Path, env: dict[str, str] | None = None, *trust: str) -> None:
    """eval reproduces the run's test; the ONNX export is checked by onnxruntime inside
    stable-cnn-export; predict runs on the exported file. ``trust``: trust_code=true for
    a checkpoint that names code of the user's. Paths are quoted, as a sweep job's folder
    (1_model=resnet) must be."""
    evaluated = command(
        "stable-cnn-eval", f"checkpoint='{run_dir}'", *trust, cwd=run_dir.parent, env=env
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    result = json.loads(next((run_dir / "eval").glob("*/eval.json")).read_text())
    assert result["test_acc"] == json.loads((run_dir / "results.json").read_text())["test_acc"]
    exported = command(
        "stable-cnn-export", f"checkpoint='{run_dir}'", *trust, cwd=run_dir.parent, env=env
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "checked with onnxruntime" in exported.stdout
    images = run_dir.parent / "images"
    if not images.exists():
        from PIL import Image

        images.mkdir()
        for k in range(3):
            Image.new("L", (28, 28), 40 * k).save(images / f"{k}.png")
    predicted = command(
        "stable-cnn-predict",
        f"checkpoint='{run_dir / 'export' / 'best.onnx'}'",
        f"input='{images}'",
        f"out='{run_dir / 'predictions.csv'}'",
        cwd=run_dir.parent,
        env=env,
    )
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    assert len((run_dir / "predictions.csv").read_text().splitlines()) == 4


def resumes_exactly(args: list[str], folder: Path, env: dict[str, str] | None = None) -> None:
    """An uninterrupted run and one stopped by SIGTERM in its second epoch, then resumed,
    end with the same metrics, results and weights."""
    whole, stopped = folder / "whole", folder / "stopped"
    train(args, whole, env)
    stop_in_second_epoch(args, stopped, folder, env)
    resumed = train([*args, f"trainer.resume={stopped}"], stopped, env)
    assert "resuming from" in resumed
    assert_same_run(whole, stopped)


def test_a_model_of_your_own_with_gradient_accumulation(
    my_models: dict[str, str], fashion_mnist_root: Path, tmp_path: Path
):
    """model=custom with a class from a module the package never saw (and +model.hidden):
    trains, resumes exactly mid-accumulation, evaluates, exports and predicts; without
    its module on PYTHONPATH, eval says so in one line."""
    args = [
        *small_real(fashion_mnist_root),
        "model=custom",
        "model._target_=my_models.PlainNet",
        "+model.hidden=12",
        "trainer.accumulate_grad_batches=3",
        "trainer.epochs=3",
        "trainer.deterministic=true",
        "data.limit_train=1536",
    ]
    resumes_exactly(args, tmp_path, my_models)
    run_dir = tmp_path / "whole"
    log = (run_dir / "train.log").read_text()
    assert "model my_models.PlainNet hidden=12" in log
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 3 * 8  # 24/3
    refuses_to_run_its_code(
        run_dir,
        my_models,
        "model._target_=my_models.PlainNet",
        "stable-cnn-eval",
        "stable-cnn-export",
        "stable-cnn-predict",
    )
    exports_and_predicts(run_dir, my_models, "trust_code=true")
    lost = command("stable-cnn-eval", f"checkpoint={run_dir}", "trust_code=true", cwd=tmp_path)
    assert lost.returncode == 2
    assert "cannot import my_models" in lost.stdout + lost.stderr


def refuses_to_run_its_code(run_dir: Path, env: dict[str, str], named: str, *names: str) -> None:
    """A checkpoint is data: without trust_code=true, the commands ``names`` refuse in one
    line naming the code, import none of it, and write nothing."""
    imported = run_dir.parent / "my_code_imported"
    env = {**env, "MY_CODE_IMPORTED": str(imported)}
    predict_args = [f"input={run_dir / 'train.log'}", f"out={run_dir / 'refused.csv'}"]
    for name in names:
        args = predict_args if name == "stable-cnn-predict" else []
        refused = command(name, f"checkpoint={run_dir}", *args, cwd=run_dir.parent, env=env)
        lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
        assert refused.returncode == 2 and len(lines) == 1, (name, lines)
        assert named in lines[0] and "trust_code=true" in lines[0], lines[0]
        assert not imported.exists(), f"{name} imported the checkpoint's module"
    assert not (run_dir / "refused.csv").exists() and not (run_dir / "export").exists()
    assert not (run_dir / "eval").exists()


def test_a_crash_of_one_process_exits_1_and_keeps_the_run_folder(
    my_models: dict[str, str], fashion_mnist_root: Path, tmp_path: Path
):
    """trainer.devices=2, and a model whose forward raises on the second process: the
    command exits with the workers' failure (1, not 2: the input was fine), adds no
    error line of its own to theirs, and keeps the run's folder (train.log, events)."""
    args = [
        *small_real(fashion_mnist_root, 128),
        "model=custom",
        "model._target_=my_models.CrashesOnRank",
        "trainer.devices=2",
        "trainer.epochs=1",
        "hydra.run.dir=run",
    ]
    done = run_cli(args, tmp_path, env=my_models)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_FAILED, output
    assert "a bug in my forward" in output
    assert "training processes failed" not in output, "the workers said why"
    assert "run folder:" in (tmp_path / "run" / "train.log").read_text()


def test_a_dataset_of_your_own_in_memory_and_through_workers(
    my_models: dict[str, str], fashion_mnist_root: Path, tmp_path: Path
):
    """data=custom settles channels, size, classes, mean and std from the data, the same
    in memory (PIL images) and through DataLoader workers (float tensors); the checkpoint
    records them, so eval, export and predict work without them on the command line;
    normalised images are refused in one line."""
    args = [
        "data=custom",
        "data._target_=my_data.load",
        f"+data.folder={fashion_mnist_root}",
        "model.width=8",
        "trainer.epochs=1",
        "data.batch_size=64",
        "trainer.progress_bar=false",
    ]
    in_memory = train(args, tmp_path / "memory", my_models)
    workers = train(
        [*args, "+data.as_tensors=true", "data.cache=none"], tmp_path / "workers", my_models
    )
    settled = [
        line.split(" - ", 1)[1]
        for output in (in_memory, workers)
        for line in output.splitlines()
        if "settled from the data" in line
    ]
    assert settled[0].endswith(", cache memory") and settled[1].endswith(", cache none")
    settled = [line.rsplit(", cache", 1)[0] for line in settled]  # the same but the way
    assert len(settled) == 2 and settled[0] == settled[1], settled
    assert "in_channels 1, image_size 28, num_classes 10, val_size 64" in settled[0]
    mean = float(settled[0].split("mean [")[1].split("]")[0])
    assert abs(mean - 0.2860) < 0.01, "Fashion-MNIST's mean pixel, from 640 of its images"
    assert "loader workers" in workers and "decoding 640 + 128 images" in in_memory

    refuses_to_run_its_code(
        tmp_path / "memory", my_models, "data._target_=my_data.load", "stable-cnn-eval"
    )  # export and predict need no data
    exports_and_predicts(tmp_path / "memory", my_models, "trust_code=true")
    predictions = (tmp_path / "memory" / "predictions.csv").read_text()
    assert any(name in predictions for name in ("T-shirt/top", "Trouser", "Bag", "Sandal"))

    refused = run_cli(
        [*args, "data._target_=my_data.normalised", "hydra.run.dir=bad"], tmp_path, env=my_models
    )
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if "error:" in line]
    assert refused.returncode == 2 and len(lines) == 1 and "must be in [0, 1]" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_a_timm_model_and_a_torchvision_resnet_train_and_export(
    fashion_mnist_root: Path, tmp_path: Path
):
    """Both models in one sweep (one command, a job each), then each job's checkpoint
    evaluated, exported and predicted with. timm is optional: without it, the ResNet
    alone. (Resume is the same for every model: the custom model's test checks it.)"""
    has_timm = importlib.util.find_spec("timm") is not None
    models = "timm,resnet" if has_timm else "resnet"
    sweep = tmp_path / "sweep"
    done = run_cli(
        [
            "-m",
            *small_real(fashion_mnist_root, 128),
            f"model={models}",
            "trainer.epochs=1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "model torchvision resnet18, 3x3 stem for small images" in output
    resnet = sweep / f"{int(has_timm)}_model=resnet"
    spec = __import__("torch").load(resnet / "checkpoints" / "best.pt", weights_only=True)[
        "model_config"
    ]
    assert (spec["kind"], spec["in_channels"], spec["small_input"]) == ("resnet", 1, True)
    exports_and_predicts(resnet)
    if has_timm:
        assert "model timm resnet10t" in output
        exports_and_predicts(sweep / "0_model=timm")
    else:
        pytest.skip("timm is not installed: the ResNet alone was checked")


def test_accumulating_4_batches_of_32_equals_one_batch_of_128(tmp_path: Path):
    """On a model without BatchNorm (whose statistics see the micro-batch) and without
    random draws: the same steps, to float precision (the gradient summed in another
    order: measured 1.1e-5 at most with one thread, under 1e-5 with two)."""
    same = [
        *TINY,
        "model.batchnorm=false",
        "model.dropout=0",
        "model.head_dropout=0",
        "data.augment=false",
        "amp=off",
        "trainer.deterministic=true",
    ]
    train([*same, "data.batch_size=128"], tmp_path / "one")
    train([*same, "data.batch_size=32", "trainer.accumulate_grad_batches=4"], tmp_path / "four")
    import torch

    one, four = (
        torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        for name in ("one", "four")
    )
    assert one["counters"] == four["counters"], "the same optimizer steps, epochs, best"
    for key, value in one["model"].items():
        torch.testing.assert_close(four["model"][key], value, rtol=0, atol=3e-5)


# Hydra's own mistakes (rewritten by cli/hydra_errors.py) and one made while building go
# through the CLI as a user meets them; the rest are checked where they are made.
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=resnet", "model.width=32"], "model.width is not a key of this model"),
        (
            ["model=timm", "ablation=no_batchnorm"],
            "the ablation's and the stability map's variants are the SmallCNN's",
        ),
        (["model=custom", "model._target_=nowhere.Net"], "cannot import nowhere"),
        (
            ["trainer.patience=2"],
            "trainer.patience is not a key of this config (TrainerConfig): "
            "did you mean trainer.early_stopping_patience?",
        ),
        (["model=custom"], "model._target_ is required here and has no value"),
        (  # the data says it, not +model
            ["model=custom", "model._target_=my_models.Net", "+model.num_classes=3"],
            "+model.num_classes=3: num_classes comes from the data (10): drop it",
        ),
        (  # a key the option has: no + to add it
            ["data=custom", "data._target_=my_data.load", "+data.root=/data"],
            "data.root is a key already: write data.root=VALUE, without the +",
        ),
        (  # a key of an earlier version
            ["data=custom", "data._target_=my_data.load", "data.in_memory=false"],
            "data.in_memory is no longer a key: write data.cache=memory for true, "
            "data.cache=none for false",
        ),
    ],
)
def test_what_belongs_to_the_smallcnn_and_model_mistakes_are_one_line(
    overrides: list[str], expected: str, tmp_path: Path
):
    done = run_cli(
        [*(a for a in TINY if not a.startswith("model.")), *overrides, "hydra.run.dir=run"],
        tmp_path,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stdout
    assert not (tmp_path / "run").exists()


def test_other_model_and_data_mistakes_are_one_line():
    import torch

    from stable_cnn.data.build import build_splits
    from stable_cnn.errors import ConfigError
    from stable_cnn.models.external import timm_model

    extra_keys = {
        "+model.depthh=3": "model.depthh is not a key of model=small_cnn: did you mean "
        "model.depth?",
        "+data.folder=/data": "data.folder is not a key of data=synthetic",
        "+trainer.patience=2": "trainer.patience is not a key of trainer: did you mean "
        "trainer.early_stopping_patience?",
        "+optimizer.weight_decy=0": "did you mean optimizer.weight_decay?",
        "+scheduler.warmup=1": "scheduler.warmup is not a key of scheduler=cosine",
        "+clipping.max=1": "did you mean clipping.max_norm?",
        "+ema.decay_rate=0.9": "did you mean ema.decay?",
    }
    for override, expected in extra_keys.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            compose_run([*TINY, override])
    if importlib.util.find_spec("timm") is not None:
        with pytest.raises(ConfigError, match="'no_such_net' is not a timm model"):
            timm_model("no_such_net", 1, 10, False, {})
    custom = compose_run([*TINY, "data=custom", "data._target_=nowhere.load"]).data
    with pytest.raises(ConfigError, match=re.escape("data._target_=nowhere.load: cannot import")):
        build_splits(custom, torch.device("cpu"), 0)
