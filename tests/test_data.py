"""Data: the offline Fashion-MNIST install, splits, batch augmentation, image folders."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stable_cnn.data.augment import random_crop, random_flip
from stable_cnn.data.build import build_splits
from stable_cnn.data.datasets import install_idx_files
from stable_cnn.data.splits import Shard
from stable_cnn.data.tensors import TensorBatches
from stable_cnn.errors import DataError
from tests.conftest import FASHION_MNIST_SYSTEM_DIR, REPO, TINY, compose_run


def test_system_copy_is_decompressed_into_torchvisions_layout(fashion_mnist_root):
    raw = fashion_mnist_root / "FashionMNIST" / "raw"
    names = sorted(p.name for p in raw.iterdir())
    assert names == sorted(
        [
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
        ]
    ), "no partial files are left behind"
    run = compose_run(["data.root=" + str(fashion_mnist_root), "data.download=false"])
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    assert (splits.num_train, splits.num_val, splits.num_test) == (55_000, 5_000, 10_000)
    assert splits.info.class_names[0] == "T-shirt/top" and splits.info.num_classes == 10
    images, _labels = next(iter(splits.val))
    assert images.shape == (1024, 1, 28, 28) and images.dtype == torch.float32
    # Normalised with the dataset's statistics: roughly zero mean, unit std.
    assert abs(images.mean().item()) < 0.2 and 0.8 < images.std().item() < 1.2


def test_limits_and_validation_split(fashion_mnist_root):
    run = compose_run(
        [
            f"data.root={fashion_mnist_root}",
            "data.limit_train=300",
            "data.limit_test=200",
            "data.batch_size=100",
        ]
    )
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    assert (splits.num_train, splits.num_val, splits.num_test) == (300, 200, 200)
    assert len(splits.train) == 3 and not splits.val_is_test
    run = compose_run([f"data.root={fashion_mnist_root}", "data.val_size=0", "data.limit_test=50"])
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    assert splits.val_is_test and splits.num_train == 60_000


def test_missing_dataset_offline_names_both_fixes(tmp_path):
    empty = tmp_path / "no-such-system-copy"
    run = compose_run(
        [f"data.root={tmp_path / 'data'}", "data.download=false", f"data.system_dir={empty}"]
    )
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        build_splits(run.data, torch.device("cpu"), seed=0)
    assert "data.download=true" in str(err.value)
    assert not (tmp_path / "data").exists(), "nothing half-made is left behind"


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.exists(), reason="needs dataset-fashion-mnist")
def test_interrupted_install_leaves_no_partial_file(tmp_path, monkeypatch):
    import shutil

    def fail_midway(source, out, length=0):
        out.write(source.read(1000))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", fail_midway)
    raw = tmp_path / "raw"
    with pytest.raises(OSError, match="disk full"):
        install_idx_files(FASHION_MNIST_SYSTEM_DIR, raw)
    assert list(raw.iterdir()) == []


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 2, 6, 6), dtype=torch.uint8)
    cropped = random_crop(images, padding=2, generator=generator)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for k in range(64):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(cropped[k], padded[k, :, dy : dy + 6, dx : dx + 6])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 12, "offsets vary across the batch"


def test_random_flip_mirrors_about_half_the_images():
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 1, 2, 2)
    flipped = random_flip(images, generator)
    mirrored = torch.tensor([torch.equal(f, i.flip(2)) for f, i in zip(flipped, images)])
    unchanged = torch.tensor([torch.equal(f, i) for f, i in zip(flipped, images)])
    assert torch.all(mirrored | unchanged)
    assert 400 < mirrored.sum().item() < 600


def test_tensor_batches_cover_the_training_set_once_in_a_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 8, 8).clone()
    labels = torch.arange(10)

    def epoch_labels(seed: int) -> list[int]:
        batches = TensorBatches(
            images,
            labels,
            3,
            torch.tensor([0.0]),
            torch.tensor([1.0]),
            train=True,
            generator=torch.Generator().manual_seed(seed),
        )
        assert len(batches) == 3  # the last partial batch is dropped
        return [int(x) for _, batch_labels in batches for x in batch_labels]

    first = epoch_labels(0)
    assert len(set(first)) == 9 and first == epoch_labels(0) and first != epoch_labels(1)


def write_image_folder(root, layout: dict[str, dict[str, int]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


def test_image_folder_loads_classes_from_subfolders(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 3}})
    run = compose_run(
        ["data=image_folder", f"data.root={tmp_path}", "data.batch_size=4", "data.num_workers=0"]
    )
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    assert splits.info.class_names == ("cat", "dog") and splits.info.num_classes == 2
    assert (splits.num_train, splits.num_val, splits.num_test) == (12, 5, 5)
    images, labels = next(iter(splits.train))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1}


def test_image_folder_decodes_once_into_memory_with_the_images_own_statistics(
    tmp_path, monkeypatch, caplog
):
    """data.cache=auto: a folder that fits is decoded once into uint8 and trained as the
    built-in datasets are (batches augmented as tensors); mean and std come from its
    training images, the same whichever way the images are read, and are recorded; a
    value given still wins. Where the decoded images would not fit (the memory this
    job may take, faked at the OS's answer), auto reads them one by one."""
    from stable_cnn.data import image_cache
    from stable_cnn.data.decode import channel_stats
    from stable_cnn.data.tensors import TensorBatches

    write_image_folder(tmp_path, {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 3}})
    # at the files' own size: the two ways resize differently (torch's, PIL's)
    args = ["data=image_folder", f"data.root={tmp_path}", "data.batch_size=4", "data.image_size=20"]
    caplog.set_level(logging.INFO, logger="stable_cnn")
    decoded = build_splits(compose_run(args).data, torch.device("cpu"), seed=0)
    assert isinstance(decoded.train, TensorBatches) and "data.cache=auto: memory" in caplog.text
    assert decoded.resolved["cache"] == "memory"
    mean, std = channel_stats(decoded.train.images)
    assert (decoded.resolved["mean"], decoded.resolved["std"]) == (mean, std)
    assert mean != [0.485, 0.456, 0.406], "not ImageNet's"
    read = build_splits(
        compose_run([*args, "data.cache=none", "data.num_workers=0"]).data,
        torch.device("cpu"),
        seed=0,
    )
    assert (read.resolved["mean"], read.resolved["std"]) == (mean, std)
    given = compose_run([*args, "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]).data
    assert build_splits(given, torch.device("cpu"), seed=0).resolved["mean"] == [0.5] * 3
    monkeypatch.setattr(
        image_cache, "available_memory", lambda: 1000
    )  # bytes: 12 images do not fit
    assert build_splits(compose_run(args).data, torch.device("cpu"), 0).resolved["cache"] == "disk"
    assert "data.cache=auto: disk" in caplog.text
    (tmp_path / "a_file").write_text("")  # a cache folder that cannot be made: one by one
    nowhere = compose_run([*args, f"data.cache_dir={tmp_path / 'a_file' / 'cache'}"]).data
    assert build_splits(nowhere, torch.device("cpu"), 0).resolved["cache"] == "none"
    assert "set data.cache_dir" in caplog.text


def test_a_disk_cache_is_built_once_reused_and_rebuilt_when_its_folder_changes(tmp_path, caplog):
    """data.cache=disk: the first build decodes each folder into a file, later ones read
    it (the same images as data.cache=memory decodes); a changed image file, or a build
    that never finished (no key beside its array), is built anew; data.cache_dir moves
    it; nothing is left half written."""
    images = tmp_path / "images"
    write_image_folder(images, {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 3}})
    args = ["data=image_folder", f"data.root={images}", "data.batch_size=4", "data.image_size=20"]
    caplog.set_level(logging.INFO, logger="stable_cnn")

    def train_images(*more: str) -> torch.Tensor:  # each with its label
        caplog.clear()
        config = compose_run([*args, *more]).data
        train = build_splits(config, torch.device("cpu"), seed=0).train
        images = train.images[torch.arange(len(train.labels))]  # disk: read from the file
        pairs = torch.cat([images.flatten(1), train.labels[:, None].to(torch.uint8)], 1)
        return torch.unique(pairs, dim=0)  # each image with its label, in any order

    in_memory = train_images("data.cache=memory")
    built = train_images("data.cache=disk")
    assert torch.equal(built, in_memory) and caplog.text.count("decoded into") == 2
    cache = images / ".stable_cnn_cache"
    files = sorted(p.name.split("-")[0] + "".join(p.suffixes) for p in cache.iterdir())
    assert files == [".lock", *(f"{s}.{x}" for s in ("train", "val") for x in FILES)]
    (val_key,) = cache.glob("val-*.json")
    assert torch.equal(train_images("data.cache=disk"), in_memory)
    assert "decoded into" not in caplog.text and caplog.text.count("reading") == 2

    changed = images / "train" / "dog" / "3.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(0, 10**18))  # a new modification time, whatever the clock says
    rebuilt = train_images("data.cache=disk")
    assert "train/ changed since" in caplog.text and not torch.equal(rebuilt, in_memory)

    val_key.unlink()  # as a build killed before its key was written
    val_key.with_suffix(".npy").write_bytes(b"half")
    train_images("data.cache=disk")
    assert caplog.text.count("decoded into") == 1 and "reading" in caplog.text
    assert not list(cache.glob("*.tmp*")), "nothing half written is left"

    elsewhere = tmp_path / "cache"
    assert torch.equal(train_images("data.cache=disk", f"data.cache_dir={elsewhere}"), rebuilt)
    assert len(list(elsewhere.glob("train-3x20x20-*.rows.npy"))) == 1


FILES = ("json", "npy", "rows.npy")  # of a disk cache, per folder

BUILD_CACHE = """
import logging, sys
sys.path.insert(0, sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(message)s")
import torch
from stable_cnn.data.build import build_splits
from tests.conftest import compose_run
args = ["data=image_folder", f"data.root={sys.argv[1]}", "data.cache=disk", "data.batch_size=4"]
build_splits(compose_run(args).data, torch.device("cpu"), seed=0)
"""


def test_jobs_side_by_side_build_one_disk_cache(tmp_path):
    """Three processes started at once on a folder without a cache (a sweep's jobs side
    by side): one decodes each folder, the others wait for it and read its file; the
    remains of a build that was killed are cleared."""
    write_image_folder(tmp_path, {"train": {"cat": 60, "dog": 60}, "val": {"cat": 2, "dog": 3}})
    (tmp_path / ".stable_cnn_cache").mkdir()
    root = hashlib.sha256(str((tmp_path / "train").resolve()).encode()).hexdigest()[:8]
    stem = f"train-3x32x32-{root}"  # the name a build of train/ writes under, killed
    killed = tmp_path / ".stable_cnn_cache" / f"{stem}.999.tmp.npy"
    killed.write_bytes(b"half")
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_CACHE, str(tmp_path), str(REPO)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    said = "".join(outputs)
    assert said.count("decoded into") == 2 and said.count("reading") == 4, said
    assert not killed.exists()


@pytest.mark.parametrize(("cache", "workers"), [("memory", 0), ("memory", 2), ("none", 2)])
def test_an_unreadable_image_is_one_line_naming_the_file(
    cache: str, workers: int, tmp_path, monkeypatch
):
    from stable_cnn.data import image_folder

    monkeypatch.setattr(image_folder, "PARALLEL_FROM", 1)  # decode even 10 images in workers
    write_image_folder(tmp_path, {"train": {"cat": 4, "dog": 4}, "val": {"cat": 1, "dog": 1}})
    (tmp_path / "train" / "dog" / "2.png").write_bytes(b"not a png")
    run = compose_run(
        [
            "data=image_folder",
            f"data.root={tmp_path}",
            "data.batch_size=2",
            f"data.cache={cache}",
            f"data.num_workers={workers}",
        ]
    )
    with pytest.raises(DataError) as raised:
        splits = build_splits(run.data, torch.device("cpu"), seed=0)
        list(splits.train)
    line = str(raised.value)  # what the command prints
    assert re.fullmatch(r".*dog/2.png cannot be read as an image .*: remove or replace it", line)


def test_worker_processes_decode_the_images_one_process_does(tmp_path, monkeypatch):
    """A large folder decodes in data.num_workers processes: the same pixels and labels,
    in the same order, as decoding in the process."""
    from stable_cnn.data import image_folder

    write_image_folder(tmp_path, {"train": {"cat": 9, "dog": 7}, "val": {"cat": 1, "dog": 1}})
    args = ["data=image_folder", f"data.root={tmp_path}", "data.batch_size=2"]
    train, _, _, _ = image_folder.folder_datasets(compose_run(args).data)
    alone = image_folder.decode_files(train, compose_run([*args, "data.num_workers=2"]).data)
    monkeypatch.setattr(image_folder, "PARALLEL_FROM", 1)
    monkeypatch.setattr(image_folder, "DECODE_BATCH", 3)  # several batches, out of step
    shared = image_folder.decode_files(train, compose_run([*args, "data.num_workers=2"]).data)
    assert torch.equal(shared[0], alone[0]) and torch.equal(shared[1], alone[1])
    assert alone[0].float().std() > 0, "real pixels"


def test_image_folder_with_mismatched_classes_is_refused(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "fox": 1}})
    run = compose_run(["data=image_folder", f"data.root={tmp_path}", "data.batch_size=2"])
    with pytest.raises(DataError, match="same class folders"):
        build_splits(run.data, torch.device("cpu"), seed=0)


def test_image_folder_batches_resume_at_the_next_batch_augmented_alike(tmp_path):
    """A resumed epoch continues at the next batch with the same crops and flips, even
    with another data.num_workers (workers used to draw from seeds of their own)."""
    write_image_folder(tmp_path, {"train": {"cat": 8, "dog": 8}, "val": {"cat": 1, "dog": 1}})

    def fresh(workers: int, augment: bool = True):
        run = compose_run(
            [
                "data=image_folder",
                "data.cache=none",  # the DataLoader path
                f"data.root={tmp_path}",
                "data.batch_size=4",
                f"data.num_workers={workers}",
                "data.crop_padding=4",
                f"data.augment={augment}",
            ]
        )
        return build_splits(run.data, torch.device("cpu"), seed=0).train

    whole_epoch = [images for images, _ in fresh(0)]
    interrupted = fresh(0)
    iterator = iter(interrupted)
    first = [next(iterator)[0] for _ in range(2)]
    state = interrupted.state_dict()  # as a mid-epoch checkpoint saves it
    resumed = fresh(2)
    resumed.load_state_dict(state)
    rest = [images for images, _ in resumed]
    assert len(whole_epoch) == 4 and len(first) + len(rest) == 4
    assert all(torch.equal(a, b) for a, b in zip(whole_epoch, first + rest, strict=True))
    assert not torch.equal(whole_epoch[0], next(iter(fresh(0, augment=False)))[0]), "augmented"
    next_epoch = [images for images, _ in resumed]
    assert not torch.equal(next_epoch[0], whole_epoch[0]), "a new epoch draws anew"


def child_processes() -> set[int]:
    tasks = Path("/proc/self/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


def test_image_folder_keeps_its_loader_workers_from_epoch_to_epoch(tmp_path):
    """One DataLoader per run: its worker processes are started once, not every epoch."""
    write_image_folder(tmp_path, {"train": {"cat": 8, "dog": 8}, "val": {"cat": 1, "dog": 1}})
    run = compose_run(
        [
            "data=image_folder",
            "data.cache=none",
            f"data.root={tmp_path}",
            "data.batch_size=4",
            "data.num_workers=2",
        ]
    )
    train = build_splits(run.data, torch.device("cpu"), seed=0).train
    before = child_processes()
    first_epoch = [labels for _, labels in train]
    workers = child_processes() - before
    second_epoch = [labels for _, labels in train]
    assert len(workers) == 2 and child_processes() - before == workers
    assert len(first_epoch) == len(second_epoch) == 4


def test_image_folder_shards_are_disjoint_equal_and_evaluate_every_image_once(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 11, "dog": 10}, "val": {"cat": 4, "dog": 3}})
    run = compose_run(
        [
            "data=image_folder",
            "data.cache=none",  # the tensor path's shards are test_two_ranks.py's
            f"data.root={tmp_path}",
            "data.batch_size=4",
            "data.eval_batch_size=2",
            "data.num_workers=0",
            "data.augment=false",
            "data.image_size=8",
        ]
    )

    def shard(index: int):
        return build_splits(run.data, torch.device("cpu"), 0, Shard(index, 2))

    first, second = shard(0), shard(1)
    assert len(first.train) == len(second.train) == 2  # 21 images: 10 each, 2 full batches
    seen = [torch.cat([images for images, _ in split.train]) for split in (first, second)]
    flat = [{tuple(image.flatten().tolist()) for image in images} for images in seen]
    assert not flat[0] & flat[1], "no image trained on by both processes in one epoch"
    evaluated = sum(len(labels) for split in (first, second) for _, labels in split.val)
    assert evaluated == 7, "every validation image once"


def test_random_erasing_matches_torchvisions_in_distribution():
    """Batched erasing against torchvision's RandomErasing on 4,000 28x28 images: the same
    erase rate and the same mean erased area, within 4 standard errors; each erased
    region is one rectangle of zeros."""
    from torchvision.transforms import RandomErasing

    from stable_cnn.data.augment import random_erase

    count, p, scale, ratio = 4000, 0.5, (0.02, 0.33), (0.3, 3.3)
    images = torch.ones(count, 1, 28, 28)
    ours = random_erase(images, p, scale, ratio, torch.Generator().manual_seed(0)) == 0
    torch.manual_seed(0)
    reference = RandomErasing(p=p, scale=scale, ratio=ratio, value=0)
    theirs = torch.stack([reference(image) for image in images]) == 0
    for erased in (ours, theirs):
        assert erased.any((1, 2, 3)).float().mean().item() == pytest.approx(p, abs=4 * 0.0079)
    areas = [erased.float().mean((1, 2, 3)) for erased in (ours, theirs)]
    areas = [a[a > 0] for a in areas]
    spread = (areas[0].var() / len(areas[0]) + areas[1].var() / len(areas[1])).sqrt()
    assert abs(areas[0].mean() - areas[1].mean()) < 4 * spread
    assert areas[0].min() >= 0.01 and areas[0].max() <= 0.4  # 0.02-0.33, boxes rounded
    for mask in ours[:200, 0]:  # a rectangle: its bounding box is all erased
        if mask.any():
            rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
            box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()


def test_erasing_off_draws_nothing_and_changes_nothing():
    from stable_cnn.data.augment import random_erase

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    assert random_erase(images, 0.0, (0.02, 0.33), (0.3, 3.3), generator) is images
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_flip_tta_averages_the_logits_of_both_mirror_images():
    from stable_cnn.data.augment import TestTimeAugmentation
    from stable_cnn.models.small_cnn import SmallCNN
    from stable_cnn.system.hardware import FP32, Runtime
    from stable_cnn.training.evaluation import evaluate

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4).eval()
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    runtime = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    expected = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    stats = evaluate(model, [(images, labels)], runtime, TestTimeAugmentation(flip=True))
    assert stats.accuracy == pytest.approx(expected)
    plain = evaluate(model, [(images, labels)], runtime)
    assert plain.loss != pytest.approx(stats.loss), "the mirror images changed the logits"


def test_training_batches_are_erased_and_evaluation_batches_are_not():
    run = compose_run([*TINY, "data.erase_prob=1.0", "data.erase_scale=[0.1,0.2]"])
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    images, _ = next(iter(splits.train))
    zero_fraction = (images == 0).float().mean((1, 2, 3))
    assert (zero_fraction >= 0.05).float().mean() > 0.9, "nearly every image has a box of zeros"
    val_images, _ = next(iter(splits.val))
    assert (val_images == 0).float().mean() < 0.01


def subset_labels(subset) -> list[int]:
    return [subset.dataset.targets[i] for i in subset.indices]


def test_limits_on_a_class_sorted_folder_keep_every_class_in_proportion(tmp_path):
    """A folder lists its images class by class: data.limit_train=50 of 100 images in 10
    classes (19, 9, 9, ... per class) takes each class in proportion, and limit_test
    does the same for val/; the sample is the same in every run; data.sampling=first
    keeps the first N, as runs before it did."""
    counts = {f"class_{k}": 19 if k == 0 else 9 for k in range(10)}
    write_image_folder(tmp_path, {"train": counts, "val": {name: 4 for name in counts}})
    args = [
        "data=image_folder",
        f"data.root={tmp_path}",
        "data.batch_size=4",
        "data.limit_train=50",
        "data.limit_test=20",
    ]
    from stable_cnn.data.image_folder import folder_datasets

    train, val, _, _ = folder_datasets(compose_run(args).data)
    per_class = np.bincount(subset_labels(train), minlength=10)
    # 9.5 and 4.5 each, five of the ten rounded up (seeded ties), none left out
    assert per_class.sum() == 50 and per_class[0] in (9, 10)
    assert all(count in (4, 5) for count in per_class[1:]), per_class
    assert np.bincount(subset_labels(val), minlength=10).tolist() == [2] * 10
    assert subset_labels(folder_datasets(compose_run(args).data)[0]) == subset_labels(train)

    first, *_ = folder_datasets(compose_run([*args, "data.sampling=first"]).data)
    assert set(subset_labels(first)) == {0, 1, 2, 3, 4}  # the first 50: five classes of ten


def test_the_hold_out_and_limits_of_fashion_mnist_are_stratified(fashion_mnist_root):
    run = compose_run(
        [
            f"data.root={fashion_mnist_root}",
            "data.val_size=1000",
            "data.limit_train=2000",
            "data.limit_test=500",
        ]
    )
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    for split, each in ((splits.train, 200), (splits.val, 50), (splits.test, 50)):
        assert torch.bincount(split.labels, minlength=10).tolist() == [each] * 10


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_balanced_class_weights_come_from_the_training_labels(cache: str, tmp_path, caplog):
    """trainer.class_weights=balanced on a folder of 9 cats and 3 dogs weighs a cat 12 /
    (2 x 9) and a dog 12 / (2 x 3), on the tensor path and through loader workers; a list
    of the wrong length is one line."""
    from stable_cnn.errors import ConfigError
    from stable_cnn.training.build import training_loss

    write_image_folder(tmp_path, {"train": {"cat": 9, "dog": 3}, "val": {"cat": 1, "dog": 1}})
    args = [
        "data=image_folder",
        f"data.root={tmp_path}",
        "data.batch_size=4",
        f"data.cache={cache}",
        "data.num_workers=0",
    ]
    caplog.set_level(logging.INFO, logger="stable_cnn")
    run = compose_run([*args, "trainer.class_weights=balanced"])
    splits = build_splits(run.data, torch.device("cpu"), seed=0)
    loss = training_loss(run.trainer, splits, torch.device("cpu"))
    assert loss.weight.tolist() == pytest.approx([12 / 18, 12 / 6])
    assert "class weights of the training loss: cat 0.667, dog 2" in caplog.text
    wrong = compose_run([*args, "trainer.class_weights=[1.0,2.0,3.0]"])
    with pytest.raises(ConfigError, match="has 3 values for 2 classes"):
        training_loss(wrong.trainer, splits, torch.device("cpu"))
    plain = training_loss(compose_run(args).trainer, splits, torch.device("cpu"))
    assert plain.weight is None
