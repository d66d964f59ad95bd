"""data=custom sized to the job and handled as carefully as the built-in data: limits
limit what is decoded, eval decodes only its split, statistics stream in bounded chunks
(peak memory measured in a subprocess), the in-memory decision counts the cgroup's limit
and the GPU's free memory and is agreed by every process, channels settle from a sample,
and a bad label is one line naming its image on both the in-memory and the worker path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stable_cnn.data.build import build_splits
from stable_cnn.data.image_cache import fits_in_memory
from stable_cnn.errors import ConfigError, DataError
from stable_cnn.system.memory import available_memory, cgroup_available
from tests.conftest import REPO, TINY, compose_run, run_cli

# A user's dataset module: images made from the index (so every process sees the same),
# every read counted, labels listed as ``targets`` or not, a bad label where asked.
MY_DATA = """
import atexit
import os

import torch

READS = []
if os.environ.get("READS_FILE"):  # a command's reads, counted where a test can see them
    atexit.register(lambda: open(os.environ["READS_FILE"], "w").write(str(len(READS))))


class Patterns:
    def __init__(self, count, size, channels, with_targets, bad_label_at, grey_first, unique):
        self.count, self.size, self.channels = count, size, channels
        self.bad_label_at, self.grey_first, self.unique = bad_label_at, grey_first, unique
        self.classes = [f"pattern {k}" for k in range(4)]
        if with_targets:
            self.targets = [self.label(i) for i in range(count)]
        if unique:  # names of files that are nowhere (a dataset's own bookkeeping)
            self.samples = [(f"image_{i}.png", self.label(i)) for i in range(count)]

    def label(self, index):
        return 4 if index == self.bad_label_at else index % 4

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        READS.append(index)
        channels = 1 if index == 0 and self.grey_first else self.channels
        image = torch.full((channels, self.size, self.size), (index % 4) * 60, dtype=torch.uint8)
        image[:, index % self.size] = 255  # a line whose place tells images apart
        if self.unique:  # and the index itself, so that no two images are alike
            image[0, 0, :2] = torch.tensor([index % 256, index // 256])
        return image, self.label(index)


def at(root, count=512):  # a loader that takes data.root
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    return load(count=count)


def load(count=512, size=16, channels=3, with_targets=True, bad_label_at=-1, grey_first=False,
         fails_on_rank=-1, unique=False):
    if int(os.environ.get("LOCAL_RANK", "0")) == fails_on_rank:
        raise FileNotFoundError("no images where this process looks")
    make = lambda n, bad: Patterns(n, size, channels, with_targets, bad, grey_first, unique)
    return make(count, bad_label_at), make(count // 4, -1)
"""


@pytest.fixture(scope="module")
def my_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mine")
    (folder / "my_patterns.py").write_text(MY_DATA)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def custom(*extra: str) -> list[str]:
    return [*TINY, "data=custom", "data._target_=my_patterns.load", "data.batch_size=32", *extra]


def test_limits_limit_what_is_decoded_and_eval_decodes_only_its_split(my_data: Path):
    import my_patterns

    my_patterns.READS.clear()
    config = compose_run(custom("data.limit_train=64", "data.limit_test=32")).data
    splits = build_splits(config, torch.device("cpu"), seed=0)
    assert (splits.num_train, splits.num_val, splits.num_test) == (64, 32, 32)
    # 16 to settle the channels and size, then the 128 images the run uses, once each
    assert len(my_patterns.READS) <= 16 + 64 + 32 + 32
    assert torch.bincount(splits.train.labels).tolist() == [16] * 4  # targets: stratified

    my_patterns.READS.clear()
    settled = compose_run(
        custom("data.limit_test=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.3,0.3,0.3]")
    ).data
    tested = build_splits(settled, torch.device("cpu"), seed=0, test_only=True)
    assert tested.train is None and tested.num_test == 32
    assert len(my_patterns.READS) <= 16 + 32


def test_channels_settle_from_a_sample_not_the_first_image(my_data: Path, caplog):
    caplog.set_level(logging.INFO, logger="stable_cnn")
    config = compose_run(custom("+data.grey_first=true", "data.limit_train=64")).data
    splits = build_splits(config, torch.device("cpu"), seed=0)
    assert splits.info.in_channels == 3
    assert "1 of 16 sampled training images are greyscale" in caplog.text


def test_a_bad_label_names_its_image_on_every_path(my_data: Path, tmp_path: Path):
    for extra in ([], ["data.cache=none"], ["data.cache=disk", f"data.cache_dir={tmp_path}"]):
        config = compose_run(custom("+data.bad_label_at=37", *extra)).data
        with pytest.raises(DataError, match=r"train image 37 has label 4, outside 0\.\.3"):
            build_splits(config, torch.device("cpu"), seed=0)


def test_a_bad_label_read_by_a_loader_worker_is_one_line(my_data: Path, tmp_path: Path):
    """Without ``targets`` the worker path meets the label as it reads the image, inside
    a DataLoader worker: still one line, exit 2, before a GPU could assert on it."""
    env = {"PYTHONPATH": f"{my_data}{os.pathsep}{REPO}"}
    done = run_cli(
        custom(
            "data.cache=none",
            "+data.with_targets=false",
            "+data.bad_label_at=37",
            "data.val_size=0",
            "data.num_workers=1",
            "hydra.run.dir=run",
        ),
        tmp_path,
        env=env,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line]
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert "train image 37 has label 4, outside 0..3 for 4 classes" in lines[0]
    assert "Traceback" not in lines[0]


def test_two_processes_agree_to_hold_the_images_in_memory(my_data: Path, tmp_path: Path):
    env = {"PYTHONPATH": f"{my_data}{os.pathsep}{REPO}"}
    done = run_cli(
        custom("trainer.devices=2", "trainer.epochs=1", "hydra.run.dir=run"), tmp_path, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "decoding 512 + 128 images into memory" in done.stdout + done.stderr


PEAK = """
import resource, sys, torch
import torchvision.transforms.functional  # imports and their tables, before measuring
sys.path.insert(0, {folder!r})
from stable_cnn.data.build import build_splits
from tests.conftest import compose_run
config = compose_run({overrides!r}).data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
splits = build_splits(config, torch.device("cpu"), seed=0)
print(splits.num_train + splits.num_test,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_decoding_and_statistics_stay_near_the_size_of_the_images(my_data: Path):
    """4,096 RGB images of 64x64 are 48 MiB as uint8: decoding them and computing their
    mean and std takes about that, not a float copy of thousands of images (the chunks
    used to be 4,096 images, 17x their uint8 size at the peak)."""
    overrides = custom("+data.count=4096", "+data.size=64", "data.val_size=0", "data.cache=memory")
    script = textwrap.dedent(PEAK.format(folder=str(my_data), overrides=overrides))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    images, grown_kib = (int(v) for v in done.stdout.split())
    decoded_mib = images * 3 * 64 * 64 / 2**20
    assert images == 4096 + 1024
    assert grown_kib / 1024 < decoded_mib + 120, (grown_kib / 1024, decoded_mib)


def test_the_memory_decision_counts_the_cgroup_limit_and_the_gpu(tmp_path: Path, monkeypatch):
    """A SLURM job with --mem=2G on a big host (cgroup v1; the page cache it could give
    back does not count as used), a container's v2 limit on a parent group: the least
    that is left counts; on a GPU its free memory counts too (faked at torch.cuda's
    boundary)."""
    v1 = tmp_path / "v1"
    job = v1 / "memory" / "slurm" / "job_7"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(str(2 * 2**30))
    (job / "memory.usage_in_bytes").write_text(str(2**29))  # 256 MiB of it page cache:
    (job / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {2**28}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1")
    groups = tmp_path / "cgroup-v1"
    groups.write_text("5:cpuset:/\n4:memory:/slurm/job_7\n")
    assert cgroup_available(groups, v1) == 2 * 2**30 - (2**29 - 2**28)  # reclaimable cache

    v2 = tmp_path / "v2"
    (v2 / "box" / "inner").mkdir(parents=True)
    (v2 / "box" / "memory.max").write_text(str(2**30) + "\n")
    (v2 / "box" / "memory.current").write_text(str(2**28))
    (v2 / "box" / "inner" / "memory.max").write_text("max\n")
    groups.write_text("0::/box/inner\n")
    assert cgroup_available(groups, v2) == 2**30 - 2**28
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 999999999 kB\nMemAvailable: 500000000 kB\n")
    assert available_memory(meminfo, groups, v2) == 2**30 - 2**28

    config = compose_run(custom()).data
    config = type(config)(**{**config.__dict__, "in_channels": 3, "image_size": 224})
    images = 1000  # 150 MB as uint8
    assert fits_in_memory(config, images, torch.device("cpu"))  # this machine: GiBs free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**28, 2**34))
    assert not fits_in_memory(config, images, torch.device("cuda:0"))  # 256 MiB free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**33, 2**34))
    assert fits_in_memory(config, images, torch.device("cuda:0"))


def test_lr_auto_reuses_the_decoded_images(my_data: Path, tmp_path: Path):
    """optimizer.lr=auto's range test trains on the run's own decoded images: each image
    is read once, not once for the test and again for the run."""
    reads = tmp_path / "reads"
    env = {"PYTHONPATH": f"{my_data}{os.pathsep}{REPO}", "READS_FILE": str(reads)}
    done = run_cli(
        custom("optimizer.lr=auto", "trainer.epochs=1", "data.cache=memory", "hydra.run.dir=run"),
        tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "optimizer.lr=auto:" in done.stdout
    # 461 training images, batches of 32: an epoch is 14 steps, the range test 20, not 300
    assert "optimizer.lr=auto: a range test of 20 steps (one epoch of this data is 14" in (
        done.stdout
    )
    assert int(reads.read_text()) <= 16 + 512 + 128


def test_a_run_through_loader_workers_resumes_exactly_as_it_started(my_data: Path, tmp_path: Path):
    """data=custom's worker path, with dropout: stopped in its second epoch and resumed,
    it ends as the uninterrupted run does, bit for bit; the resumed run takes what the
    data settled from the checkpoint instead of working it out again."""
    from stable_cnn.state.checkpoint import load_checkpoint
    from stable_cnn.state.record import CheckpointRecord
    from stable_cnn.state.resume import data_as_it_started
    from tests.test_resume import assert_same_run, stop_in_second_epoch

    env = {**os.environ, "PYTHONPATH": f"{my_data}{os.pathsep}{REPO}"}
    args = custom(
        "data.cache=none",
        "data.num_workers=1",
        "+data.count=2048",
        "+data.with_targets=false",
        "trainer.deterministic=true",
        "trainer.progress_bar=false",
    )
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    done = run_cli([*args, f"hydra.run.dir={whole}"], tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    stop_in_second_epoch(args, stopped, tmp_path, env)
    record = CheckpointRecord.read(load_checkpoint(stopped / "checkpoints" / "last.pt"), stopped)
    continued = data_as_it_started(compose_run(args).data, record)
    assert continued.cache == "none" and continued.mean == record.data_resolved["mean"]
    assert continued.sampling == "stratified" and continued.val_size == 204
    resumed = run_cli(
        [*args, f"trainer.resume={stopped}", f"hydra.run.dir={stopped}"], tmp_path, env=env
    )
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout
    assert_same_run(whole, stopped)


def test_a_dataset_that_fails_in_one_process_stops_every_process(my_data: Path, tmp_path: Path):
    """The callable raises on the second process alone (a path missing on one node): the
    first does not wait for it for ever, but stops with one line that says why."""
    env = {"PYTHONPATH": f"{my_data}{os.pathsep}{REPO}"}
    done = run_cli(
        custom("trainer.devices=2", "+data.fails_on_rank=1", "hydra.run.dir=run"), tmp_path, env=env
    )
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() if "error:" in line]
    assert errors == [errors[0]] and "no images where this process looks (on rank 1)" in errors[0]


def images_with_labels(batches) -> torch.Tensor:
    """Every image of a split with its label, in one order whatever the split's (the
    images are told apart by their pixels: +data.unique=true)."""
    images = batches.images[torch.arange(len(batches.labels))]  # from a file, where it is one
    pairs = torch.cat([images.flatten(1), batches.labels[:, None].to(torch.uint8)], 1)
    distinct = torch.unique(pairs, dim=0)  # sorted
    assert len(distinct) == len(pairs), "no image twice"
    return distinct


def test_a_disk_cache_of_your_datasets_is_built_once_and_read_by_later_runs(
    my_data: Path, tmp_path: Path, caplog, monkeypatch
):
    """data.cache=disk: the first run decodes each of the callable's datasets into a file
    (labels too: these datasets do not list them), later runs read it (the same images and
    labels as data.cache=memory decodes), a dataset whose images changed is decoded anew.
    Their ``samples`` name files that do not exist: the key goes by their pixels."""
    import my_patterns

    caplog.set_level(logging.INFO, logger="stable_cnn")
    args = custom(
        "+data.with_targets=false", "+data.unique=true", "data.limit_train=64", "data.limit_test=32"
    )
    disk = [*args, "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"]
    in_memory = build_splits(compose_run(args).data, torch.device("cpu"), seed=0)
    my_patterns.READS.clear()
    built = build_splits(compose_run(disk).data, torch.device("cpu"), seed=0)
    assert built.resolved["cache"] == "disk" and caplog.text.count("decoded into") == 2
    assert sorted(set(my_patterns.READS)) == list(range(512)), "every image of both datasets"
    reads = len(my_patterns.READS)
    assert 512 + 128 <= reads <= 16 + 2 * 64 + 512 + 128, "each once, and the key's sample"
    for split in ("train", "val", "test"):
        expected = images_with_labels(getattr(in_memory, split))
        assert torch.equal(images_with_labels(getattr(built, split)), expected), split
    assert built.resolved["mean"] == in_memory.resolved["mean"]

    caplog.clear()
    my_patterns.READS.clear()
    again = build_splits(compose_run(disk).data, torch.device("cpu"), seed=0)
    assert "decoded into" not in caplog.text and caplog.text.count("reading") == 2
    assert len(my_patterns.READS) <= 16 + 2 * 64, "the shape and the key's sample alone"
    assert torch.equal(images_with_labels(again.train), images_with_labels(built.train))

    caplog.clear()
    brighter = my_patterns.Patterns.__getitem__
    monkeypatch.setattr(  # the same call, other pixels: the sample in the key sees it
        my_patterns.Patterns, "__getitem__", lambda self, i: (brighter(self, i)[0] // 2, i % 4)
    )
    build_splits(compose_run(disk).data, torch.device("cpu"), seed=0)
    assert caplog.text.count("changed since") == 2 and caplog.text.count("decoded into") == 2


def test_a_run_and_its_eval_share_the_disk_cache(my_data: Path, tmp_path: Path):
    """A run with data.cache=disk trains from the file it built, and stable-cnn-eval on
    its checkpoint reads the test file instead of decoding the test images again."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{my_data}{os.pathsep}{REPO}",
        "READS_FILE": str(tmp_path / "reads"),
    }
    cache = tmp_path / "cache"
    done = run_cli(
        custom(
            "data.cache=disk", f"data.cache_dir={cache}", "trainer.epochs=1", "hydra.run.dir=run"
        ),
        tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data custom, settled from the data:" in done.stdout and "cache disk" in done.stdout
    assert len(list(cache.glob("custom-*.rows.npy"))) == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    evaluated = evaluate(checkpoint, tmp_path, env)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "data.cache=disk: reading" in evaluated.stdout + evaluated.stderr
    assert int((tmp_path / "reads").read_text()) <= 16 + 64, "the shape and the key alone"


def test_a_cache_folder_that_cannot_be_written_is_one_line(my_data: Path, tmp_path: Path):
    (tmp_path / "a_file").write_text("")
    config = compose_run(
        custom("data.cache=disk", f"data.cache_dir={tmp_path / 'a_file' / 'cache'}")
    ).data
    with pytest.raises(DataError, match=r"a_file/cache cannot be written .*: set data.cache_dir"):
        build_splits(config, torch.device("cpu"), seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"], "nothing left behind"


def test_a_checkpoint_of_data_in_memory_evaluates(tmp_path: Path, fashion_mnist_root: Path):
    """A data=custom run from before data.cache (fixtures/old_runs, written by 3678dec,
    with data.in_memory): stable-cnn-eval tests its checkpoint, its images in memory."""
    fixtures = REPO / "tests" / "fixtures"
    (old_run,) = (fixtures / "old_runs").glob("*-custom")
    (tmp_path / "data").symlink_to(fashion_mnist_root)  # its +data.folder=data
    env = {**os.environ, "PYTHONPATH": f"{fixtures / 'user_code'}{os.pathsep}{REPO}"}
    checkpoint = old_run / "checkpoints" / "best.pt"
    done = evaluate(checkpoint, tmp_path, env, f"out={tmp_path / 'eval'}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "decoding 0 + 256 images into memory" in done.stdout + done.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["test_acc"] > 30


def evaluate(checkpoint: Path, cwd: Path, env: dict[str, str], *extra: str):
    """stable-cnn-eval on ``checkpoint``, trusting its data code, as a user runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stable_cnn.cli.eval",
            f"checkpoint={checkpoint}",
            "trust_code=true",
            *extra,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_data_root_goes_to_a_callable_that_names_it(my_data: Path, tmp_path: Path):
    """data.root (and data.download) are given to the callable where it names them; set
    for one that does not, they are one line."""
    at_root = compose_run(
        custom("data._target_=my_patterns.at", f"data.root={tmp_path}", "+data.count=64")
    ).data
    assert build_splits(at_root, torch.device("cpu"), seed=0).num_train > 0
    elsewhere = compose_run(custom(f"data.root={tmp_path}")).data
    with pytest.raises(ConfigError, match=r"data.root=.* is set but my_patterns.load takes no"):
        build_splits(elsewhere, torch.device("cpu"), seed=0)
