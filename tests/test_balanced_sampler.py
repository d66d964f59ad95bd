"""data.sampler=balanced: on a 10:1 imbalanced set of real Fashion-MNIST images, each
epoch draws both classes about alike, on the tensor path and the DataLoader path, and
a run stopped mid-epoch continues the same draw."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, Subset

from stable_cnn.data.datasets import load_tensors
from stable_cnn.data.loaders import ShuffledLoader, dataset_labels
from stable_cnn.data.splits import ONE_PROCESS
from stable_cnn.data.tensors import training_batches
from tests.conftest import compose_run, run_cli
from tests.test_resume import write_fashion_folder

BATCH = 50


@pytest.fixture(scope="module")
def imbalanced(fashion_mnist_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """1,000 T-shirts (class 0) and 100 trousers (class 1), real images."""
    run = compose_run([f"data.root={fashion_mnist_root}", "data.download=false"])
    images, labels, _ = load_tensors(run.data, train=False)
    chosen = torch.cat([(labels == 0).nonzero()[:1000, 0], (labels == 1).nonzero()[:100, 0]])
    return images[chosen], labels[chosen]


def shares(batches) -> dict[int, float]:
    counts = Counter(int(label) for _, labels in batches for label in labels)
    return {label: count / sum(counts.values()) for label, count in sorted(counts.items())}


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


def test_the_tensor_path_draws_every_class_alike_and_resumes_the_draw(
    fashion_mnist_root: Path, imbalanced
):
    run = compose_run([f"data.root={fashion_mnist_root}", "data.sampler=balanced"])
    config = replace(run.data, batch_size=BATCH)

    def batches():
        return training_batches(config, *imbalanced, torch.device("cpu"), 0, ONE_PROCESS)

    shuffle = replace(config, sampler="shuffle")
    shuffled = training_batches(shuffle, *imbalanced, torch.device("cpu"), 0, ONE_PROCESS)
    assert shares(shuffled)[1] == pytest.approx(100 / 1100, abs=0.02), "the imbalance itself"
    whole = batches()
    epoch = list(whole)
    assert len(epoch) == 1100 // BATCH, "as many draws as images"
    assert 0.42 < shares(epoch)[1] < 0.58

    stopped = batches()
    first = list(islice(iter(stopped), 7))
    state = stopped.state_dict()
    resumed = batches()
    resumed.load_state_dict(state)
    assert same_batches(first + list(resumed), epoch)
    assert not same_batches(list(whole), epoch), "the next epoch draws anew"


class FashionImages(Dataset):
    """Real images as a user's dataset would hand them over, with their labels listed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.targets = images, labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255, self.targets[index]


def test_the_dataloader_path_draws_every_class_alike_and_resumes_the_draw(imbalanced):
    dataset = Subset(FashionImages(*imbalanced), list(range(1100)))

    def loader() -> ShuffledLoader:
        return ShuffledLoader(dataset, BATCH, 0, seed=3, balanced_by=dataset_labels(dataset))

    whole = loader()
    epoch = list(whole)
    assert len(epoch) == 1100 // BATCH
    assert 0.42 < shares(epoch)[1] < 0.58

    stopped = loader()
    first = list(islice(iter(stopped), 7))
    resumed = loader()
    resumed.load_state_dict(stopped.state_dict())
    assert same_batches(first + list(resumed), epoch)


@pytest.mark.slow
def test_a_balanced_run_of_an_image_folder_says_how_it_draws(
    fashion_mnist_root: Path, tmp_path: Path
):
    fashion_folder = write_fashion_folder(tmp_path / "images", fashion_mnist_root, 30, 5)
    done = run_cli(
        [
            "data=image_folder",
            f"data.root={fashion_folder}",
            "data.cache=none",  # the DataLoader path: the labels come from the folders
            "data.sampler=balanced",
            "data.batch_size=32",
            "model.width=8",
            "trainer.epochs=1",
            "trainer.device=cpu",
            "diagnostics.figures_every_n_epochs=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "data.sampler=balanced: 300 draws an epoch, every class alike" in done.stdout
