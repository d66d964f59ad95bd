"""A trained model's predictions for image files, as CSV: every file Pillow can read,
converted to the model's channels and size as ``data=image_folder`` does in training,
predicted in batches; a checkpoint on the best device, an exported file on the CPU."""

from __future__ import annotations

import csv
import glob
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from stable_cnn.deploy.trained_model import EXPORTED, ModelCard, load_trained_model
from stable_cnn.errors import ConfigError
from stable_cnn.system.atomic import atomic_write
from stable_cnn.system.hardware import resolve_device

log = logging.getLogger("stable_cnn")

BATCH_SIZE = 256


def find_images(given: str) -> list[Path]:
    """``input=...`` as files: one file, every file under a folder, or a glob pattern;
    sorted, so the CSV's order is stable."""
    path = Path(given).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise ConfigError(
            f"input={given!r} is no file, folder or glob that matches a file: check the path"
        )
    return matches


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # (N, C, H, W) float in [0, 1]
    paths: list[Path]


class ImageReader:
    """Files to the model's input: channels converted (greyscale <-> RGB) and the size
    resized as ``data=image_folder`` does in training; counts what it had to change."""

    def __init__(self, card: ModelCard) -> None:
        from torchvision import transforms

        self.card = card
        self.mode = "L" if card.in_channels == 1 else "RGB"
        self.resize = transforms.Resize((card.image_size, card.image_size))
        self.to_tensor = transforms.ToTensor()
        self.resized = 0
        self.skipped: list[Path] = []

    def read(self, path: Path) -> torch.Tensor | None:
        """The image as (C, H, W) floats in [0, 1]; None (and one line) if unreadable."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)  # decodes: a file cut short fails here
        except Exception as err:  # a bad file raises OSError, DecompressionBombError, TypeError...
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("skipped %s: not an image Pillow can read (%s)", path, reason[:120])
            self.skipped.append(path)
            return None
        if image.size != (self.card.image_size, self.card.image_size):
            image = self.resize(image)
            self.resized += 1
        return self.to_tensor(image)

    def batches(self, paths: list[Path]) -> Iterator[ImageBatch]:
        pixels, kept = [], []
        for path in paths:
            tensor = self.read(path)
            if tensor is None:
                continue
            pixels.append(tensor)
            kept.append(path)
            if len(kept) == BATCH_SIZE:
                yield ImageBatch(torch.stack(pixels), kept)
                pixels, kept = [], []
        if kept:
            yield ImageBatch(torch.stack(pixels), kept)


@dataclass
class Predictor:
    """Pixels in [0, 1] (N, C, H, W) on the CPU -> logits; and what the model expects."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    card: ModelCard


def open_predictor(path: Path, device_name: str, trust_code: bool = False) -> Predictor:
    """A checkpoint (run on ``device_name``; a model of the user's own only with
    ``trust_code``), or a file stable-cnn-export wrote (.onnx through ONNX Runtime, .pt2
    through torch.export; on the CPU)."""
    opener = EXPORTED.get(path.suffix)
    if opener is not None:
        if not path.is_file():
            raise ConfigError(f"checkpoint={path} does not exist: check the path")
        exported = opener(path, trust_code)
        log.info("running %s with %s", path, exported.runner)
        return Predictor(exported.run, exported.card)
    trained = load_trained_model(path, trust_code)
    device = resolve_device(device_name)
    classifier = trained.classifier.to(device)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return classifier(pixels.to(device))

    return Predictor(logits, trained.card)


def predict_files(
    checkpoint: Path,
    paths: list[Path],
    top_k: int,
    device_name: str,
    out: Path,
    trust_code: bool = False,
) -> tuple[int, ImageReader]:
    """Write ``out`` (CSV) with one row per readable image; returns the rows written and
    the reader (what it skipped and resized)."""
    predictor = open_predictor(checkpoint, device_name, trust_code)
    names = predictor.card.class_names
    top_k = min(top_k, len(names))
    reader = ImageReader(predictor.card)
    table = io.StringIO()
    writer = csv.writer(table)
    header = ["path", "label", "confidence"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"prob_{rank}"]
    writer.writerow(header)
    rows = 0
    for batch in reader.batches(paths):
        probabilities = predictor.logits(batch.pixels).float().softmax(dim=1)
        top = probabilities.topk(top_k, dim=1)  # one host read per batch, below
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        for path, probs, classes in zip(batch.paths, values, indices, strict=True):
            row: list[object] = [str(path), names[classes[0]], f"{probs[0]:.4f}"]
            for index, prob in zip(classes, probs, strict=True):
                row += [names[index], f"{prob:.4f}"]
            writer.writerow(row)
            rows += 1
    if rows:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as file:
            file.write(table.getvalue().encode())
    return rows, reader
