"""Training and evaluation batches of map-style datasets through DataLoader workers
(data=image_folder's way, and data=custom's where the images do not fit in memory): the
training order and every image's augmentation fixed by the seed, whatever the workers."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from stable_cnn.config import DataConfig
from stable_cnn.data.splits import ONE_PROCESS, DatasetInfo, DataSplits, Shard, check_batch_size
from stable_cnn.data.tensors import ClassIndex, balanced_draw
from stable_cnn.errors import DataError
from stable_cnn.system.hardware import loader_workers, usable_cores
from stable_cnn.system.seeding import stream_seed


def loader_splits(
    config: DataConfig,
    datasets: tuple[Any, Any, Any],
    info: DatasetInfo,
    seed: int,
    device: torch.device,
    shard: Shard = ONE_PROCESS,
    val_is_test_reason: str | None = None,
) -> DataSplits:
    """The train, val and test ``datasets`` (val may be test itself), each item an
    (image tensor, label) pair, as the run's splits. ``seed`` is the data stream's;
    ``device`` the run's (batches are pinned for a GPU); ``shard`` this process's share.
    ``data.num_workers=null`` is sized from the cores this process may use.

    Every DataLoader has a generator of its own: starting an iterator draws its workers'
    seed from it, which would otherwise come from torch's global generator, the dropout
    stream, at points of the run that differ for a resumed process."""
    train_set, val_set, test_set = datasets
    workers = config.num_workers
    if workers is None:
        workers = loader_workers(usable_cores())
    pin_memory = device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
    check_batch_size(config, len(train_set), shard.count)

    def loader(dataset: Any) -> DataLoader:
        return DataLoader(
            evaluation_share(dataset, config.eval_batch_size, shard),
            batch_size=config.eval_batch_size,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            worker_init_fn=leave_stop_signals_to_the_trainer,
            generator=torch.Generator().manual_seed(stream_seed(seed, "evaluation workers")),
        )

    test = loader(test_set)
    val = test if val_set is test_set else loader(val_set)
    reason = {} if val_is_test_reason is None else {"val_is_test_reason": val_is_test_reason}
    balanced_by = None
    if config.sampler == "balanced":
        balanced_by = dataset_labels(train_set)
        if balanced_by is None:
            raise DataError(
                "data.sampler=balanced needs every training image's label, and this dataset "
                "does not list them: give it a targets list (as torchvision's datasets "
                "have), or use data.cache=memory"
            )
    return DataSplits(
        ShuffledLoader(train_set, config.batch_size, workers, seed, shard, pin_memory, balanced_by),
        val,
        test,
        info,
        len(train_set),
        len(val_set),
        len(test_set),
        val_is_test=val_set is test_set,
        loader_workers=workers,
        **reason,
    )


def augmentations(config: DataConfig) -> tuple[list, list]:
    """The training transforms around normalising: crop and flip before (on a PIL image or
    a tensor), random erasing after (value 0: the mean). None without data.augment."""
    from torchvision import transforms

    if not config.augment:
        return [], []
    before = [transforms.RandomCrop(config.image_size, padding=config.crop_padding)]
    if config.flip:
        before.append(transforms.RandomHorizontalFlip())
    after = []
    if config.erase_prob > 0:
        after.append(
            transforms.RandomErasing(
                config.erase_prob, tuple(config.erase_scale), tuple(config.erase_ratio), value=0
            )
        )
    return before, after


def dataset_labels(dataset: Any) -> torch.Tensor | None:
    """Every image's label, where the dataset lists them (``targets``, as an ImageFolder
    and torchvision's datasets do): of a Subset, of a wrapper of the user's dataset, or
    of the dataset itself; None where it does not."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "dataset"):  # ImagesOf: the user's dataset
        return dataset_labels(dataset.dataset)
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):  # strings, ragged lists: not labels
        return None
    usable = labels.dim() == 1 and len(labels) == len(dataset) and not labels.is_floating_point()
    if targets is None or not usable or labels.dtype == torch.bool or (labels < 0).any():
        return None
    return labels.long()


def evaluation_share(dataset: Any, batch_size: int, shard: Shard) -> Any:
    """This process's evaluation batches: whole batches of the single-process sequence
    (batch ``shard.index``, then every ``shard.count``-th), so that each image is
    evaluated once, in the same company, and the summed counts equal one process's."""
    if shard.count == 1:
        return dataset
    batches = range(shard.index, -(-len(dataset) // batch_size), shard.count)
    mine = [
        i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))
    ]
    return Subset(dataset, mine)


class ShuffledLoader:
    """Training batches of a map-style dataset through DataLoader workers.

    The order is torch's DistributedSampler's (shuffled from the seed and the epoch,
    each process its own share, the same number of batches on each), and every image's
    augmentation draws from a seed of its own, chosen by the epoch and the image. So
    what a batch holds, and how it is augmented, depends neither on ``data.num_workers``
    nor on where a resumed epoch continues: a checkpoint keeps only the epoch and the
    position.

    One DataLoader serves the whole run, its workers started once and kept between
    epochs (``persistent_workers``); each epoch hands it that epoch's batches, and seeds
    its generator (which seeds the workers) from the seed and the epoch."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int,
        seed: int,
        shard: Shard = ONE_PROCESS,
        pin_memory: bool = False,
        balanced_by: torch.Tensor | None = None,
    ) -> None:
        self.dataset = SeededAugmentation(dataset)
        # data.sampler=balanced: each image's chance in a draw, from the labels given
        self.draw_weights = None if balanced_by is None else ClassIndex.of(balanced_by)
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = DistributedSampler(
            dataset,
            num_replicas=shard.count,
            rank=shard.index,
            shuffle=True,
            seed=seed % 2**62,
            drop_last=True,
        )
        self.epoch = 0  # epochs started
        self.position = 0  # batches of the current epoch already handed out
        self.in_epoch = False
        self.plan = EpochPlan()
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.plan,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=leave_stop_signals_to_the_trainer,
            generator=torch.Generator(),  # seeded in __iter__; never the dropout stream
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # the last partial batch is dropped

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.in_epoch:  # a new epoch; a resumed one continues its own
            self.epoch, self.position, self.in_epoch = self.epoch + 1, 0, True
        order, seeds = self.epoch_order()
        size = self.batch_size
        self.plan.batches = [
            list(
                zip(order[k * size : (k + 1) * size], seeds[k * size : (k + 1) * size], strict=True)
            )
            for k in range(self.position, len(self))
        ]
        self.loader.generator.manual_seed(stream_seed(self.seed, f"workers/{self.epoch}"))
        for batch in self.loader:
            self.position += 1
            yield batch
        self.in_epoch = False

    def epoch_order(self) -> tuple[list[int], list[int]]:
        """This process's images of the current epoch, in order, and each one's
        augmentation seed: its share of the DistributedSampler's shuffle (a seed per
        image), or of a balanced draw seeded by the epoch (a seed per draw, so that an
        image drawn twice is augmented twice)."""
        draws = torch.Generator().manual_seed((self.seed + self.epoch) % 2**62)
        if self.draw_weights is None:
            image_seeds = torch.randint(2**62, (len(self.dataset),), generator=draws).tolist()
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            return order, [image_seeds[i] for i in order]
        balanced = torch.Generator().manual_seed(stream_seed(self.seed, f"balanced/{self.epoch}"))
        everyone = balanced_draw(self.draw_weights, balanced).tolist()
        draw_seeds = torch.randint(2**62, (len(everyone),), generator=draws).tolist()
        share = len(everyone) // self.shard.count  # the same on every process
        mine = slice(self.shard.index, share * self.shard.count, self.shard.count)
        return everyone[mine], draw_seeds[mine]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "in_epoch": self.in_epoch}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state:  # a generator and an order: the loader before this one
            raise DataError(
                "this image_folder checkpoint was written by an older stable-cnn, whose "
                "data order and augmentation a run can no longer continue: start a new run"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self.in_epoch = state["in_epoch"]


class EpochPlan:
    """The batch sampler of ShuffledLoader's DataLoader: the batches of the pass about to
    start (the loader iterates it anew at every pass, in the main process)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SeededAugmentation(Dataset):
    """Indexed by (image, seed): the image's random transforms draw from that seed, in
    whichever process or DataLoader worker decodes it (torchvision's transforms draw
    from torch's global CPU generator, which is put back afterwards). Only that one is
    seeded: ``torch.manual_seed`` would also reseed every CUDA generator, which
    ``fork_rng(devices=[])`` does not put back, and with ``data.num_workers=0`` the
    run's dropout masks on the GPU would follow the last image's seed."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group and SLURM signals every process: workers
    ignore both, so the main process can finish its step and save (DataLoader still
    shuts them down, and they exit when the main process dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
