"""A trained model outside the trainer: rebuilt from its checkpoint, fed plain pixels.

``stable-cnn-eval``, ``stable-cnn-export`` and ``stable-cnn-predict`` start here. The
checkpoint holds everything needed: the model config, the weights (and their average
with ``ema=on``, which the run itself validated and tested), and the data config whose
normalisation the model expects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_cnn.errors import ConfigError
from stable_cnn.state.checkpoint import CheckpointError, load_checkpoint
from stable_cnn.state.record import CheckpointRecord, rebuild_model

log = logging.getLogger("stable_cnn")


@dataclass(frozen=True)
class ModelCard:
    """What a user of the model needs to feed it and read its output."""

    class_names: tuple[str, ...]
    in_channels: int
    image_size: int  # the model was trained on image_size x image_size images
    mean: tuple[float, ...]  # the data's normalisation, applied inside PixelClassifier
    std: tuple[float, ...]
    data: str  # the dataset it was trained on
    weights: str  # "ema" (the run's average) or "raw" (as trained; "last step" before)
    # which point of the run: "epoch 5 of 5, its best validation accuracy", ...
    taken: str = "unknown"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input": "float32 images in [0, 1], shape (N, C, H, W)"}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        """The card as ``as_dict`` wrote it (into an exported file's metadata)."""
        return cls(
            class_names=tuple(values["class_names"]),
            in_channels=int(values["in_channels"]),
            image_size=int(values["image_size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            data=str(values["data"]),
            weights=str(values["weights"]),
            taken=str(values.get("taken", "unknown")),  # files exported before 2026-12-02
        )


class PixelClassifier(nn.Module):
    """The trained model with its data's normalisation inside: float images in [0, 1],
    shape (N, C, H, W), in; logits, shape (N, classes), out. A user feeds pixels, not
    the training set's statistics."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


@dataclass
class TrainedModel:
    classifier: PixelClassifier  # eval mode, fp32, on the CPU
    card: ModelCard
    path: Path  # the checkpoint it came from


def load_trained_model(path: Path, trust_code: bool = False) -> TrainedModel:
    """The checkpoint at ``path`` as a PixelClassifier in eval mode, with its card; a
    model of the user's own that it names is imported and called only with ``trust_code``."""
    state = load_checkpoint(path)
    record = CheckpointRecord.read(state, path)
    model = rebuild_model(state, record, path, trust_code)
    data = record.data
    classes = record.model_config["num_classes"]
    class_names = record.class_names
    if len(class_names) != classes:  # written before checkpoints carried the names
        class_names = tuple(f"class_{i}" for i in range(classes))
        log.warning(
            "%s does not name its classes (an older checkpoint): using class_0..class_%d",
            path,
            classes - 1,
        )
    card = ModelCard(
        class_names=class_names,
        in_channels=record.model_config["in_channels"],
        image_size=data.image_size,
        mean=tuple(float(m) for m in data.mean),
        std=tuple(float(s) for s in data.std),
        data=data.name,
        weights="ema" if record.averaged else "raw",
        taken=point_in_run(state),
    )
    classifier = PixelClassifier(model, card.mean, card.std).eval()
    return TrainedModel(classifier, card, path)


MONITOR_WORDS = {
    "val_acc": "validation accuracy",
    "val_loss": "validation loss",
    "val_f1": "validation macro-F1",
    "val_top5": "validation top-5 accuracy",
}


def point_in_run(state: dict[str, Any]) -> str:
    """Which point of its run a checkpoint's weights are from, in words."""
    counters = state.get("counters") or {}
    epoch, trainer = counters.get("epoch", 0), (state.get("config") or {}).get("trainer", {})
    trainer = trainer if isinstance(trainer, dict) else {}
    of = f" of {trainer['epochs']}" if "epochs" in trainer else ""
    if state.get("progress") is not None:  # stopped by a signal within an epoch
        return f"step {counters.get('global_step', 0)}, in epoch {epoch + 1}{of} (stopped there)"
    if counters.get("best_epoch") == epoch:
        monitor = trainer.get("monitor", "val_acc")  # runs before trainer.monitor: val_acc
        return f"epoch {epoch}{of}, the best {MONITOR_WORDS.get(monitor, monitor)} so far"
    return f"epoch {epoch}{of}"


# Where stable-cnn-export puts the card in a .pt2 archive (an ONNX file keeps it in its
# metadata under the key "stable_cnn").
PT2_CARD_FILE = "stable_cnn.json"


@dataclass
class ExportedModel:
    """A file stable-cnn-export wrote, ready to run: float images in [0, 1], shape
    (N, C, H, W), on the CPU, in; logits out."""

    run: Callable[[torch.Tensor], torch.Tensor]
    card: ModelCard
    runner: str  # what runs it, for logs


def open_onnx(path: Path, trust_code: bool = False) -> ExportedModel:
    """An exported .onnx file through ONNX Runtime, or, where that is not installed,
    ONNX's checker and reference evaluator (slow, but needs nothing beyond onnx).
    ``trust_code`` is not needed: ONNX Runtime runs operators, not Python (the openers
    share one signature)."""
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        metadata = session.get_modelmeta().custom_metadata_map

        def run(images: torch.Tensor) -> torch.Tensor:
            (logits,) = session.run(["logits"], {"images": images.numpy()})
            return torch.from_numpy(logits)

        runner = f"onnxruntime {onnxruntime.__version__}"
    else:
        try:
            import onnx
            from onnx.reference import ReferenceEvaluator
        except ImportError:
            raise ConfigError(
                f"{path} is an ONNX file: reading it needs onnxruntime (pip install "
                f"'stable-cnn[export]'), or use the checkpoint it was exported from"
            ) from None
        onnx.checker.check_model(str(path))
        evaluator = ReferenceEvaluator(str(path))
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}

        def run(images: torch.Tensor) -> torch.Tensor:
            (logits,) = evaluator.run(["logits"], {"images": images.numpy()})
            return torch.from_numpy(logits)

        runner = f"onnx {onnx.__version__} checker + reference evaluator"
    if "stable_cnn" not in metadata:
        raise CheckpointError(
            f"{path} was not written by stable-cnn-export (no stable_cnn "
            f"metadata): pass a file it wrote, or a checkpoint"
        )
    return ExportedModel(run, ModelCard.from_dict(json.loads(metadata["stable_cnn"])), runner)


def open_pt2(path: Path, trust_code: bool = False) -> ExportedModel:
    """An exported .pt2 file (torch.export's ExportedProgram). Loading one unpickles the
    Python objects it may hold (torch.export.load has no safe mode), so a file from
    elsewhere is opened only with ``trust_code``."""
    if not trust_code:
        raise CheckpointError(
            f"{path} is a torch.export program, and loading one runs the pickled Python "
            f"objects it may hold: if you trust the file, run again with trust_code=true; "
            f"else use the .onnx export or the checkpoint"
        )
    extra = {PT2_CARD_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:  # torch raises many kinds for a file it cannot read
        raise CheckpointError(
            f"{path} is not a torch.export program "
            f"({str(err).splitlines()[0][:160]}): pass a .pt2 file "
            f"stable-cnn-export wrote"
        ) from None
    if not extra[PT2_CARD_FILE]:
        raise CheckpointError(
            f"{path} was not written by stable-cnn-export (no "
            f"{PT2_CARD_FILE} inside): pass a file it wrote, "
            f"or a checkpoint"
        )
    module = program.module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    card = ModelCard.from_dict(json.loads(extra[PT2_CARD_FILE]))
    return ExportedModel(run, card, f"torch.export.load (torch {torch.__version__})")


EXPORTED = {".onnx": open_onnx, ".pt2": open_pt2}  # what stable-cnn-export writes, by suffix
