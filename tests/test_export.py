"""Using a trained model outside the trainer: stable-cnn-export (ONNX, torch.export),
stable-cnn-predict on image files, and stable-cnn-eval on the run's data elsewhere."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from stable_cnn.data.datasets import load_tensors
from stable_cnn.deploy.trained_model import load_trained_model
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.state.checkpoint import load_checkpoint
from tests.conftest import compose_run, run_cli

pytestmark = pytest.mark.slow

IMAGES = 1000  # real test images compared


def command(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A console script as a user runs it."""
    script = str(Path(sys.executable).parent / name)
    return subprocess.run(
        [script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def trained_run(fashion_mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real Fashion-MNIST run with the weight average (exports must use it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    done = run_cli(
        [
            f"data.root={fashion_mnist_root}",
            "data.limit_train=4000",
            "model.width=8",
            "trainer.epochs=2",
            "ema=on",
            "diagnostics.figures_every_n_epochs=null",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=run_dir.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir


@pytest.fixture(scope="module")
def test_pixels(fashion_mnist_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first real test images as a user has them: floats in [0, 1]; and labels."""
    data = compose_run([f"data.root={fashion_mnist_root}", "data.download=false"]).data
    images, labels, _ = load_tensors(data, train=False)
    return images[:IMAGES].float() / 255, labels[:IMAGES]


def checkpoint_logits(run_dir: Path, pixels: torch.Tensor, weights: str) -> torch.Tensor:
    """The checkpoint's own fp32 logits, from its raw ("model") or averaged ("ema") weights."""
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    config = {k: v for k, v in state["model_config"].items() if k != "name"}
    model = SmallCNN(**config).eval()
    model.load_state_dict(state["model"] if weights == "model" else state["ema"]["model"])
    data = state["config"]["data"]
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((pixels - mean) / std)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100


def assert_same_model(exported: torch.Tensor, run_dir: Path, pixels, labels) -> None:
    averaged = checkpoint_logits(run_dir, pixels, "ema")
    raw = checkpoint_logits(run_dir, pixels, "model")
    assert abs(accuracy(exported, labels) - accuracy(averaged, labels)) <= 0.1
    torch.testing.assert_close(exported, averaged, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(exported, raw, atol=1e-3), "exports the average, not the raw weights"
    assert accuracy(averaged, labels) > 60, "a model that learned"


@pytest.fixture(scope="module")
def exported(trained_run: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The run exported both ways: ONNX where it goes by default (export/best.onnx in the
    run's folder), torch.export where out= says."""
    workdir = trained_run.parent
    onnx = command("stable-cnn-export", f"checkpoint={trained_run}", "format=onnx", cwd=workdir)
    pt2_out = workdir / "model.pt2"
    pt2 = command(
        "stable-cnn-export",
        f"checkpoint={trained_run}",
        "format=pt2",
        f"out={pt2_out}",
        cwd=workdir,
    )
    return {"onnx": (trained_run / "export" / "best.onnx", onnx), "pt2": (pt2_out, pt2)}


def test_onnx_export_runs_in_onnxruntime_like_the_checkpoint(exported, trained_run, test_pixels):
    import onnx
    import onnxruntime

    out, done = exported["onnx"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "largest logit difference" in done.stderr + done.stdout
    assert f"wrote {out} (onnx" in done.stdout, "next to the checkpoint, by default"
    assert not (trained_run.parent / "outputs").exists(), "no outputs/export/<date>/ folder"

    pixels, labels = test_pixels
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    (logits,) = session.run(None, {"images": pixels.numpy()})  # 1,000 at once: dynamic batch
    assert_same_model(torch.from_numpy(logits), trained_run, pixels, labels)

    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["class_names"])[0] == "T-shirt/top"
    assert metadata["input_size"] == "1x28x28"
    card = json.loads((out.parent / "best.onnx.json").read_text())
    assert card["weights"] == "ema" and card["image_size"] == 28 and len(card["class_names"]) == 10
    best = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)["counters"]
    taken = f"epoch {best['best_epoch']} of "
    assert card["taken"].startswith(taken) and "the best validation accuracy" in card["taken"]
    assert f"averaged (ema) weights of {taken}" in done.stdout, "what it exported, truly"


def test_pt2_export_round_trips_through_torch_export(exported, trained_run, test_pixels):
    out, done = exported["pt2"]
    assert done.returncode == 0, done.stdout + done.stderr
    pixels, labels = test_pixels
    extra = {"stable_cnn.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    with torch.no_grad():
        logits = torch.cat([program.module()(pixels[:7]), program.module()(pixels[7:])])
    assert_same_model(logits, trained_run, pixels, labels)
    assert json.loads(extra["stable_cnn.json"])["class_names"][9] == "Ankle boot"


def test_export_refuses_an_unknown_format_in_one_line(trained_run, tmp_path):
    done = command("stable-cnn-export", f"checkpoint={trained_run}", "format=tflite", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert "format='tflite'" in line and "format=onnx" in line


def test_predict_labels_image_files_like_the_checkpoint(
    trained_run, test_pixels, exported, tmp_path
):
    from PIL import Image

    pixels, _ = test_pixels
    folder = tmp_path / "images"
    folder.mkdir()
    count = 40
    for index in range(count):  # PNGs holding the test images' exact pixels
        grey = (pixels[index, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(grey).save(folder / f"{index:03d}.png")
    first = Image.open(folder / "000.png")
    first.convert("RGB").save(folder / "rgb.png")  # colour: converted to greyscale
    first.resize((56, 56), Image.NEAREST).save(folder / "big.jpg")  # resized back to 28
    (folder / "x.png").write_text("not an image")
    out = tmp_path / "predictions.csv"

    done = command(
        "stable-cnn-predict",
        f"checkpoint={trained_run}",
        f"input={folder}",
        f"out={out}",
        "top_k=3",
        cwd=tmp_path,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "x.png" in log and "resized 1 image" in log
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert "x.png" not in rows and len(rows) == count + 2
    assert list(rows["000.png"]) == [
        "path",
        "label",
        "confidence",
        "class_1",
        "prob_1",
        "class_2",
        "prob_2",
        "class_3",
        "prob_3",
    ]

    names = load_trained_model(trained_run / "checkpoints" / "best.pt").card.class_names
    expected = checkpoint_logits(trained_run, pixels[:count], "ema").argmax(1).tolist()
    assert [rows[f"{i:03d}.png"]["label"] for i in range(count)] == [names[c] for c in expected]
    assert rows["rgb.png"]["label"] == rows["000.png"]["label"]
    assert rows["rgb.png"]["confidence"] == rows["000.png"]["confidence"]
    for row in rows.values():
        probs = [float(row[f"prob_{rank}"]) for rank in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert row["label"] == row["class_1"] and row["confidence"] == row["prob_1"]

    # What stable-cnn-export made runs in stable-cnn-predict too, with the same answers.
    # A .pt2 file unpickles what it holds as it loads: it needs trust_code=true.
    for fmt, (model_file, _) in exported.items():
        out_exported = tmp_path / f"predictions_{fmt}.csv"
        args = [f"checkpoint={model_file}", f"input={folder}", f"out={out_exported}", "top_k=3"]
        trust = ["trust_code=true"] if fmt == "pt2" else []
        if trust:
            refused = command("stable-cnn-predict", *args, cwd=tmp_path)
            lines = (refused.stdout + refused.stderr).strip().splitlines()
            assert refused.returncode == 2 and len(lines) == 1 and "trust_code=true" in lines[0]
            assert not out_exported.exists()
        done = command("stable-cnn-predict", *args, *trust, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        got = {Path(row["path"]).name: row for row in csv.DictReader(out_exported.open())}
        assert got.keys() == rows.keys()
        for name, row in rows.items():
            for rank in (1, 2, 3):
                assert got[name][f"class_{rank}"] == row[f"class_{rank}"], (fmt, name)
                assert float(got[name][f"prob_{rank}"]) == pytest.approx(
                    float(row[f"prob_{rank}"]), abs=2e-4
                )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "images",
        "predictions.csv",
        "predictions_onnx.csv",
        "predictions_pt2.csv",
    ], "predict writes its CSV and nothing else"


def test_predict_fails_only_when_no_image_could_be_read(trained_run, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    bad, out = tmp_path / "x.png", tmp_path / "p.csv"
    done = command(
        "stable-cnn-predict",
        f"checkpoint={trained_run}",
        f"input={bad}",
        f"out={out}",
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "x.png" in done.stdout + done.stderr and not out.exists()


def write_blank_png(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side black pixels: hundreds of megapixels, a few tens
    of kB on disk (zlib squeezes the zero rows), as a decompression bomb is."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit per pixel, grey
    squeeze = zlib.compressobj(9)
    row = bytes(1 + -(-side // 8))  # filter type 0, then the row's packed bits
    pixels = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_predict_skips_truncated_files_and_decompression_bombs(
    trained_run, test_pixels, tmp_path, monkeypatch
):
    """Files Pillow opens but cannot decode (cut short: they fail only when loaded) and
    an image over Pillow's pixel limit (DecompressionBombError, no OSError) are each
    named in one line and skipped; the CSV holds the rest."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    pixels, _ = test_pixels
    Image.fromarray((pixels[0, 0] * 255).round().to(torch.uint8).numpy()).save(folder / "good.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    for name in ("cut.png", "cut.jpg"):
        noise.save(folder / name)
        whole = (folder / name).read_bytes()
        (folder / name).write_bytes(whole[: len(whole) // 2])
        with Image.open(folder / name) as image:
            assert image.size == (64, 64), "the header is whole: only decoding fails"
    bomb = folder / "bomb.png"
    write_blank_png(bomb, 20_000)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    with monkeypatch.context() as patch:  # without the limit it is a well-formed PNG
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(bomb) as image:
            assert image.size == (20_000, 20_000)
            image.verify()
    out = tmp_path / "predictions.csv"

    done = command(
        "stable-cnn-predict",
        f"checkpoint={trained_run}",
        f"input={folder}",
        f"out={out}",
        cwd=tmp_path,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    for name in ("bomb.png", "cut.jpg", "cut.png"):  # one line each
        assert len([line for line in log.splitlines() if f"skipped {folder / name}:" in line]) == 1
    assert "3 unreadable file(s) skipped" in log and "Traceback" not in log
    assert [Path(row["path"]).name for row in csv.DictReader(out.open())] == ["good.png"]


def test_eval_takes_data_root_without_naming_the_data_group(trained_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # empty: filled from the Debian package's copy
    done = command(
        "stable-cnn-eval", f"checkpoint={trained_run}", f"data.root={elsewhere}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out_dir = trained_run / "eval" / "best-fashion_mnist"  # next to the checkpoint it tested
    assert f"wrote {out_dir / 'eval.json'}" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["elsewhere"], "no outputs/eval/<date>/ folder"
    assert (out_dir / "confusion.png").is_file()
    evaluated = json.loads((out_dir / "eval.json").read_text())
    results = json.loads((trained_run / "results.json").read_text())
    assert evaluated["test_acc"] == results["test_acc"], "the run's own test, from another folder"
    assert (elsewhere / "FashionMNIST" / "raw").is_dir()
