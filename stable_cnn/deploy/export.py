"""A trained model written as a file other runtimes load, then loaded back and checked.

``onnx`` is for ONNX Runtime and every runtime that reads ONNX; ``pt2`` is
``torch.export``'s ExportedProgram (``torch.export.load(path).module()``). Either way the
model takes float images in [0, 1], shape (N, C, H, W) with any N, and returns logits:
the data's normalisation is inside. The model card (class names, input size) goes into
the file's metadata and a JSON file beside it. A file whose outputs disagree with the
checkpoint's is an ExportError.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stable_cnn.deploy.trained_model import (
    EXPORTED,
    PT2_CARD_FILE,
    ModelCard,
    PixelClassifier,
    TrainedModel,
)
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.system.atomic import atomic_write

log = logging.getLogger("stable_cnn")

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
CHECK_BATCHES = (8, 1)  # the check runs two batch sizes: the batch dimension is dynamic
# Exported and eager fp32 logits may differ by rounding (other kernels, fused ops); a
# difference above this share of the largest logit is a wrong export, not rounding.
TOLERANCE = 1e-3


class ExportError(UserError):
    """The exported file does not reproduce the checkpoint's outputs."""

    exit_code = 1


@dataclass
class ExportResult:
    out: Path
    format: str
    checked_with: str  # what ran the exported file
    largest_difference: float  # max |exported - checkpoint| over the check's logits


def _needs(*modules: str) -> None:
    """One line naming the extra to install when an optional package is missing."""
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(
                f"format=onnx needs the {name} package: pip install 'stable-cnn[export]' "
                f"(or use format=pt2, which needs only torch)"
            ) from None


def _example(card: ModelCard, count: int) -> torch.Tensor:
    """A batch of pixels in [0, 1] (fixed seed): enough to trace and to compare outputs."""
    generator = torch.Generator().manual_seed(0)
    shape = (count, card.in_channels, card.image_size, card.image_size)
    return torch.rand(shape, generator=generator)


def _dynamic_batch() -> dict[str, dict[int, Any]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


def write_onnx(classifier: PixelClassifier, card: ModelCard, out: Path) -> None:
    _needs("onnx", "onnxscript")
    for chatty in ("onnx_ir", "onnxscript"):  # their INFO lines are about graph passes
        logging.getLogger(chatty).setLevel(logging.WARNING)
    program = torch.onnx.export(
        classifier,
        (_example(card, CHECK_BATCHES[0]),),
        dynamo=True,
        verbose=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=_dynamic_batch(),
        external_data=False,
    )
    proto = program.model_proto
    for key, value in (
        ("stable_cnn", json.dumps(card.as_dict())),
        ("class_names", json.dumps(list(card.class_names))),
        ("input_size", f"{card.in_channels}x{card.image_size}x{card.image_size}"),
        ("input_range", "[0, 1]"),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_write(out) as file:
        file.write(proto.SerializeToString())


def write_pt2(classifier: PixelClassifier, card: ModelCard, out: Path) -> None:
    program = torch.export.export(
        classifier, (_example(card, CHECK_BATCHES[0]),), dynamic_shapes=_dynamic_batch()
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PT2_CARD_FILE: json.dumps(card.as_dict())})
    with atomic_write(out) as file:
        file.write(buffer.getvalue())


WRITERS = {"onnx": write_onnx, "pt2": write_pt2}


def card_path(out: Path) -> Path:
    """The JSON beside an exported file: model.onnx -> model.onnx.json."""
    return out.with_name(out.name + ".json")


def check_export(trained: TrainedModel, fmt: str, out: Path) -> tuple[str, float]:
    """Load ``out`` back and compare its logits with the checkpoint's on two batch sizes;
    returns what ran it and the largest difference, or raises ExportError."""
    exported = EXPORTED[out.suffix](out, trust_code=True)  # the file just written
    largest, scale = 0.0, 1.0
    for count in CHECK_BATCHES:
        images = _example(trained.card, count)
        with torch.no_grad():
            expected = trained.classifier(images)
        got = exported.run(images)
        if got.shape != expected.shape:
            raise ExportError(
                f"{out} returned logits of shape {tuple(got.shape)} for a batch of {count}, "
                f"not {tuple(expected.shape)}: the export is broken"
            )
        largest = max(largest, (got.float() - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    if largest > TOLERANCE * scale:
        raise ExportError(
            f"{out} disagrees with the checkpoint: logits differ by up to {largest:.3g} "
            f"(tolerance {TOLERANCE * scale:.3g}); do not use it, and report the torch version"
        )
    return exported.runner, largest


def export_model(trained: TrainedModel, fmt: str, out: Path) -> ExportResult:
    """Write ``trained`` as ``fmt`` to ``out`` (and its card beside it, ``out`` + .json),
    then check it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt](trained.classifier, trained.card, out)
    runner, largest = check_export(trained, fmt, out)
    sidecar = {
        **trained.card.as_dict(),
        "format": fmt,
        "file": out.name,
        "input_name": "images",
        "output_name": "logits",
        "checkpoint": str(trained.path),
        "checked_with": runner,
        "largest_logit_difference": largest,
    }
    with atomic_write(card_path(out)) as file:
        file.write((json.dumps(sidecar, indent=2) + "\n").encode())
    return ExportResult(out, fmt, runner, largest)
