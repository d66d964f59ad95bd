"""Evaluation: one pass over a split (validation and test in training), and a trained
checkpoint tested (stable-cnn-eval, the ablation's overfitting measure).

The model is rebuilt from the checkpoint's own model config; the data, precision and
memory layout default to the checkpoint's run, so the test accuracy is the run's own.
Writes eval.json and confusion.png into ``out=``, by default eval/<checkpoint>-<data>/ in
the checkpoint's run folder (``outputs/<date>/<time>/eval/best-fashion_mnist/``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_cnn.config import DataConfig
from stable_cnn.data.augment import TestTimeAugmentation
from stable_cnn.data.build import build_splits, test_time_augmentation
from stable_cnn.data.splits import DataSplits
from stable_cnn.data.tensors import TensorBatches
from stable_cnn.errors import ConfigError
from stable_cnn.state.checkpoint import CheckpointError, load_checkpoint
from stable_cnn.state.record import CheckpointRecord, rebuild_model, refuse_untrusted
from stable_cnn.state.run_files import run_folder_of
from stable_cnn.system.atomic import atomic_write
from stable_cnn.system.distributed import ALONE, World
from stable_cnn.system.hardware import (
    Runtime,
    choose_memory_format,
    choose_precision,
    resolve_device,
)
from stable_cnn.training.diagnostics import confusion_figure, per_class_accuracy
from stable_cnn.training.step import autocast

log = logging.getLogger("stable_cnn")
AS_THEY_ARE = TestTimeAugmentation()  # no test-time augmentation


@dataclass
class EvalStats:
    loss: float
    accuracy: float  # percent
    images: int
    confusion: torch.Tensor  # (classes, classes) counts on the CPU: rows true, columns predicted
    top5: float | None = None  # percent whose label is among the 5 highest logits (> 5 classes)

    @property
    def per_class(self) -> list[float | None]:
        """Percent correct per true class."""
        return per_class_accuracy(self.confusion)

    @property
    def macro_f1(self) -> float:
        """The mean over classes of F1 (2 precision recall / (precision + recall)), in
        percent: each class counts alike, however many images it has. A class neither
        in the split nor predicted has no F1 and is left out, as scikit-learn does."""
        confusion = self.confusion.double()
        hits = confusion.diagonal()
        # F1 = 2 TP / (2 TP + FP + FN): rows sum to TP + FN, columns to TP + FP
        seen = confusion.sum(0) + confusion.sum(1)
        scores = 2 * hits / seen.clamp(min=1)
        return 100.0 * scores[seen > 0].mean().item()

    def summary(self, split: str, class_names: tuple[str, ...]) -> dict[str, Any]:
        """The split's metrics as results.json and metrics.jsonl name them."""
        summary: dict[str, Any] = {f"{split}_f1": self.macro_f1}
        if self.top5 is not None:
            summary[f"{split}_top5"] = self.top5
        summary[f"{split}_per_class_acc"] = dict(zip(class_names, self.per_class, strict=True))
        return summary


def evaluate(
    model: nn.Module,
    batches: Iterable,
    runtime: Runtime,
    tta: TestTimeAugmentation = AS_THEY_ARE,
    world: World = ALONE,
    num_classes: int | None = None,
) -> EvalStats:
    """Mean cross-entropy (no label smoothing, so runs compare) and accuracy in percent,
    of the logits ``tta`` makes (the model's own by default; flip and translate
    test-time augmentation). Sums stay on the device until the end: no host read per
    batch.

    With several processes, each evaluates its share of the batches and the counts are
    summed, so the accuracy equals one process's on the same weights exactly; every
    process needs ``num_classes`` then (a share may hold no batch at all)."""
    model.eval()
    device = runtime.device
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    top5_hits = torch.zeros((), device=device, dtype=torch.int64)
    confusion = None  # (true, predicted) counts, flattened; sized by the first batch
    if num_classes is not None:
        confusion = torch.zeros(num_classes**2, device=device, dtype=torch.int64)
    count = 0
    with torch.inference_mode():
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=runtime.memory_format)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, runtime.precision):
                logits = tta(model, images)
            loss_sum += criterion(logits.float(), labels)
            classes = logits.shape[1]
            if confusion is None:
                confusion = torch.zeros(classes * classes, device=device, dtype=torch.int64)
            # index_add_ rather than bincount: bincount reads the device to size its output.
            pairs = labels * classes + logits.argmax(1)
            confusion.index_add_(0, pairs, torch.ones_like(pairs))
            if classes > TOP_K:
                best = logits.topk(TOP_K, dim=1).indices
                top5_hits += (best == labels[:, None]).any(1).sum()
            count += labels.shape[0]
    sums = torch.stack([loss_sum.double(), top5_hits.double()])
    if world.distributed:
        classes = num_classes
        totals = world.sum(torch.cat([confusion.double(), sums]))
        confusion, sums = totals[:-2].round().long(), totals[-2:]
        count = int(confusion.sum().item())
    confusion = confusion.view(classes, classes).cpu()
    correct = confusion.diagonal().sum().item()
    loss, top5 = sums.tolist()  # one read for both
    return EvalStats(
        loss / count,
        100.0 * correct / count,
        count,
        confusion,
        100.0 * top5 / count if classes > TOP_K else None,
    )


TOP_K = 5  # top-5 accuracy, where there are more classes than that


def check_data_fits(model_config: dict[str, Any], data: DataConfig, path: Path) -> None:
    """One line, before any data is read, when the images or classes do not fit the model."""
    trained = (model_config["in_channels"], model_config["num_classes"])
    given = (data.in_channels, data.num_classes)  # None: settled by the data (data=custom)
    if any(g is not None and g != t for g, t in zip(given, trained, strict=True)):
        raise CheckpointError(
            f"checkpoint {path} was trained on {trained[0]}-channel images with {trained[1]} "
            f"classes; data={data.name} has {given[0]} channels and {given[1]} classes: "
            f"evaluate it on data of the same kind"
        )


class ClassesReordered(nn.Module):
    """A model whose logits come in the order of another dataset's classes: column j is
    the model's logit for that dataset's class j."""

    def __init__(self, model: nn.Module, order: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("order", torch.tensor(order), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).index_select(1, self.order)


def name_key(name: str) -> str:
    """A class name as folders can spell it: T-shirt/top, T-shirt_top and tshirt-top agree."""
    return re.sub(r"[\W_]", "", name.casefold())  # letters of every script kept


def in_class_order(
    model: nn.Module, trained: tuple[str, ...], given: tuple[str, ...], data: str, path: Path
) -> nn.Module:
    """``model`` with its logits in the order of the data's classes ``given``, matched by
    name; one line when the names differ (labels matched by index would be wrong)."""
    if not trained or tuple(trained) == tuple(given):  # unnamed: from before names were kept
        return model
    keys = [name_key(name) for name in trained]
    if sorted(keys) != sorted(name_key(name) for name in given) or len(set(keys)) < len(keys):
        raise CheckpointError(
            f"checkpoint {path} was trained on the classes {list(trained)}; data={data} has "
            f"{list(given)}: evaluate it on data of the same classes"
        )
    log.info("data=%s names the checkpoint's classes in another order: matched by name", data)
    return ClassesReordered(model, [keys.index(name_key(name)) for name in given])


@dataclass
class LoadedCheckpoint:
    model: nn.Module  # weights loaded, on the device
    runtime: Runtime  # the precision and layout its run used
    splits: DataSplits
    data: DataConfig  # what it is evaluated on: the override, else the run's own
    averaged: bool  # the weights are the run's average (ema=on), as the run tested them


def load_for_evaluation(
    path: Path,
    data: DataConfig | None,
    device_name: str,
    adjust_data: Callable[[DataConfig], DataConfig] | None = None,
    trust_code: bool = False,
    test_only: bool = True,
) -> LoadedCheckpoint:
    """The checkpoint's model, ready to evaluate on ``data`` (else the run's own data, as
    ``adjust_data`` changes it: another ``root``, say). Code the checkpoint names (a model
    or dataset callable of the user's) runs only with ``trust_code``. ``test_only``: the
    splits' train may be None (data=custom decodes only the test images)."""
    state = load_checkpoint(path)
    record = CheckpointRecord.read(state, path)
    if not trust_code:  # everything it names in one line, before anything is built
        refuse_untrusted(record.model_code() + (record.data_code() if data is None else []), path)
    model = rebuild_model(state, record, path, trust_code)
    if data is None:
        data = adjust_data(record.data) if adjust_data is not None else record.data
    if getattr(data, "mean", None) is None or getattr(data, "std", None) is None:
        # images of another folder go through the model as its training images did
        data = replace(data, mean=data.mean or record.data.mean, std=data.std or record.data.std)
    check_data_fits(record.model_config, data, path)

    device = resolve_device(device_name)
    # the precision and layout the run resolved (on this kind of device), not auto's
    amp, channels_last = record.runtime_settings(device.type)
    precision = choose_precision(amp, device)
    memory_format = choose_memory_format(device, channels_last)
    # the training images stay on the CPU: a test needs only its own split on the device
    splits = build_splits(
        data, device, record.seed, train_device=torch.device("cpu"), test_only=test_only
    )
    try:
        model = in_class_order(model, record.class_names, splits.info.class_names, data.name, path)
    except CheckpointError:
        splits.close()
        raise
    model.to(device, memory_format=memory_format)
    return LoadedCheckpoint(
        model, Runtime(device, precision, memory_format), splits, data, record.averaged
    )


def evaluate_checkpoint(
    path: Path,
    data: DataConfig | None,
    device_name: str,
    out_dir: Path | None,
    adjust_data: Callable[[DataConfig], DataConfig] | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Test the checkpoint at ``path``; returns (and writes into ``out_dir``, by default
    eval/<checkpoint>-<data>/ in its run folder) eval.json's content."""
    loaded = load_for_evaluation(path, data, device_name, adjust_data, trust_code)
    if out_dir is None:
        out_dir = run_folder_of(path) / "eval" / f"{path.stem}-{loaded.data.name}"
    model, runtime, splits = loaded.model, loaded.runtime, loaded.splits
    tta = test_time_augmentation(loaded.data)
    try:
        stats = evaluate(model, splits.test, runtime, tta)
    finally:
        splits.close()
    classes = splits.info.class_names
    per_class = per_class_accuracy(stats.confusion)
    result = {
        "checkpoint": str(path),
        "data": splits.info.name,
        "test_acc": stats.accuracy,
        "test_loss": stats.loss,
        "test_f1": stats.macro_f1,
        **({"test_top5": stats.top5} if stats.top5 is not None else {}),
        "images": stats.images,
        "precision": runtime.precision.name,
        "weights": "ema" if loaded.averaged else "raw",
        "tta_flip": tta.flip,
        "tta_translate": tta.translate,
        "per_class_acc": dict(zip(classes, per_class, strict=True)),
        "confusion": stats.confusion.tolist(),  # rows: true class, columns: predicted
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot write to {out_dir} ({err.strerror}): set out= to a folder you can write"
        ) from None
    with atomic_write(out_dir / "eval.json") as out:
        out.write((json.dumps(result, indent=2) + "\n").encode())
    figure = confusion_figure(stats.confusion, classes, f"{splits.info.name} test, {path.name}")
    if figure is not None:
        figure.savefig(out_dir / "confusion.png", dpi=110)
    return {**result, "written": str(out_dir / "eval.json")}


def training_accuracy(path: Path, count: int = 5000, device_name: str = "auto") -> float:
    """Accuracy on the first ``count`` training images as a test sees them: no
    augmentation, dropout off. Minus validation accuracy, it measures overfitting."""
    loaded = load_for_evaluation(path, None, device_name, trust_code=True, test_only=False)
    model, runtime, splits = loaded.model, loaded.runtime, loaded.splits
    train = splits.train
    if not isinstance(train, TensorBatches):
        raise ConfigError(f"training accuracy needs in-memory data, not data={splits.info.name}")
    device = runtime.device
    seen = TensorBatches(
        train.images[:count].to(device),
        train.labels[:count].to(device),
        1024,
        train.mean,
        train.std,
        train=False,
    )
    return evaluate(model, seen, runtime).accuracy


def describe(result: dict[str, Any]) -> str:
    lines = [
        f"{result['data']} test: {result['test_acc']:.2f}% of {result['images']} images "
        f"(loss {result['test_loss']:.4f}, {result['precision']}, "
        f"{result['weights']} weights)",
        "per class:",
    ]
    width = max(len(name) for name in result["per_class_acc"])
    lines += [
        f"  {name:<{width}}  " + ("   n/a (no image)" if acc is None else f"{acc:6.2f}%")
        for name, acc in result["per_class_acc"].items()
    ]
    return "\n".join(lines)
