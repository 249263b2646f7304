"""vision_data: idx and class-folder datasets, the per-image (worker) and per-batch (device) transforms,
exact resume with workers and device-side mixing, rank independence."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_lax.data.images import (AugmentConfig, ImageTrainLoader, ValidationLoader, holdout_split,
                                      open_image_dataset, read_idx, soft_targets, subset, validation_batches)

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "fashion_mnist_sample"
FMNIST = dict(image_size=28, crop_scale=(0.35, 1.0))
NO_BATCH_AUG = dict(erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)


@pytest.fixture(scope="module")
def fmnist():
    return open_image_dataset(str(SAMPLE), "train")


@pytest.fixture
def folders(tmp_path) -> Path:
    """3 classes of PNG/JPEG images of different sizes and modes, plus a truncated .jpg and a zero-byte one."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (24, 50), (64, 64), (33, 17)]
    for split, per_class in (("train", 4), ("val", 2)):
        for c, name in enumerate(["cat", "dog", "eel"]):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                w, h = sizes[(c + k) % len(sizes)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                image = image.convert("L") if k == 1 else image.convert("RGBA") if k == 3 else image
                image.save(folder / (f"{k}.png" if k % 2 else f"{k}.jpg"))
        (tmp_path / split / "cat" / "notes.txt").write_text("not an image")
        good = (tmp_path / split / "dog" / "0.jpg").read_bytes()
        (tmp_path / split / "dog" / "truncated.jpg").write_bytes(good[:len(good) // 2])
        (tmp_path / split / "eel" / "empty.jpg").write_bytes(b"")
    return tmp_path


def collect(loader, n):
    """n micro-batches as the trainer sees them on its device: (float images, soft targets)."""
    return [loader.batch_augment(*next(loader)) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- datasets --------------------------------------------------------------------------------------

def test_shipped_fashion_mnist_sample(fmnist):
    test = open_image_dataset(str(SAMPLE), "val")
    assert (len(fmnist), len(test)) == (2000, 500)
    assert fmnist.channels == 1 and fmnist.num_classes == 10 and fmnist.class_names[-1] == "Ankle boot"
    image, label = fmnist.load(0)
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and 0 <= label < 10
    labels = read_idx(SAMPLE / "train-labels-idx1-ubyte.gz")
    assert labels.min() == 0 and labels.max() == 9
    assert read_idx(SAMPLE / "t10k-images-idx3-ubyte.gz").shape == (500, 28, 28)


@pytest.mark.parametrize("cut", ["gzip", "plain", "header"])
def test_truncated_idx_file_is_a_one_line_value_error(tmp_path, cut):
    raw = gzip.decompress((SAMPLE / "t10k-images-idx3-ubyte.gz").read_bytes())
    gz = gzip.compress(raw)
    data = {"gzip": gz[:len(gz) // 2], "plain": raw[:-100], "header": raw[:9]}[cut]
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if cut == "gzip" else ""))
    path.write_bytes(data)
    with pytest.raises(ValueError) as error:
        read_idx(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_open_image_dataset_rejects_missing_and_unknown_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_image_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        open_image_dataset(str(tmp_path), "train")


def test_class_folders_load_rgb_and_bad_files_read_as_none(folders):
    train = open_image_dataset(str(folders), "train")
    assert train.class_names == ["cat", "dog", "eel"] and train.channels == 3
    assert len(train) == 3 * 4 + 2  # notes.txt is not listed; the two bad .jpg files are
    results = [train.read(i) for i in range(len(train))]
    bad = [(train.path(i).name, why) for i, (image, _, why) in enumerate(results) if image is None]
    assert sorted(bad) == [("empty.jpg", "corrupt"), ("truncated.jpg", "corrupt")]
    for image, label, _ in results:
        if image is not None:
            assert image.dtype == torch.uint8 and image.shape[0] == 3 and label in (0, 1, 2)
    assert train.paths.dtype.kind == "S" and train.labels.dtype == np.int32  # one array each, no object per file
    train.path(0).unlink()
    assert train.load(0) == (None, 0) and train.read(0)[2] == "missing"


def test_val_class_folder_not_in_train_is_an_error(folders):
    (folders / "val" / "yak").mkdir()
    with pytest.raises(ValueError, match="yak"):
        open_image_dataset(str(folders), "val")


def test_bad_images_are_dropped_and_counted(folders):
    train = open_image_dataset(str(folders), "train")
    loader = ImageTrainLoader(train, AugmentConfig(image_size=32), global_batch=14, micro_batch=7)
    batches = collect(loader, 2)
    assert loader.skipped == 2 and loader.skipped_by_reason == {"corrupt": 2}
    assert sum(len(x) for x, _ in batches) == 12
    for images, targets in batches:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert targets.shape == (len(images), 3)
    val = open_image_dataset(str(folders), "val")
    val_batches, skipped = validation_batches(val, AugmentConfig(image_size=32), micro_batch=4)
    assert skipped == 2 and sum(len(y) for _, y in val_batches) == 6
    assert all(x.shape[1:] == (32, 32, 3) and x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in val_batches)


def test_all_bad_micro_batch_is_empty(folders):
    train = open_image_dataset(str(folders), "train")
    bad = [i for i in range(len(train)) if train.load(i)[0] is None]
    loader = ImageTrainLoader(subset(train, bad), AugmentConfig(image_size=16), global_batch=2, micro_batch=2)
    images, targets = collect(loader, 1)[0]
    assert images.shape == (0, 3, 16, 16) and targets.shape == (0, 3) and loader.skipped == 2


# --- loader ----------------------------------------------------------------------------------------

def small_loader(fmnist, workers=0, world_size=1, rank=0, micro_batch=8, **augment):
    # 96 images, 32 a step: 3 steps an epoch
    return ImageTrainLoader(subset(fmnist, range(96)), AugmentConfig(**FMNIST, **augment), global_batch=32,
                            micro_batch=micro_batch, rank=rank, world_size=world_size, seed=7, workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_mid_step_and_across_epochs(fmnist, workers):
    loader = small_loader(fmnist, workers)
    assert (loader.steps_per_epoch, loader.samples_per_epoch) == (3, 96)
    reference = collect(loader, 16)  # 4 micro-batches a step, 12 an epoch
    for k in (6, 11):  # step 1 micro 2; the last micro-batch of epoch 0
        first = small_loader(fmnist, workers)
        assert_same(collect(first, k), reference[:k])
        state = first.state_dict()
        resumed = small_loader(fmnist, workers)
        resumed.load_state_dict(state)
        assert_same(collect(resumed, 16 - k), reference[k:])
    position = {k: resumed.state_dict()[k] for k in ("epoch", "step", "micro")}  # the cursor's layout (data/cursor.py)
    assert position == {"epoch": 1, "step": 1, "micro": 0}


def test_augmentation_does_not_depend_on_worker_count(fmnist):
    assert_same(collect(small_loader(fmnist, workers=0), 5), collect(small_loader(fmnist, workers=2), 5))


def test_step_samples_do_not_depend_on_world_size(fmnist):
    def step_union(world_size, step, epoch):
        return np.concatenate([small_loader(fmnist, world_size=world_size, rank=r, micro_batch=4)
                               .cursor.step_ids(step, epoch) for r in range(world_size)])
    for step, epoch in ((0, 0), (2, 1)):
        one = step_union(1, step, epoch)
        assert len(one) == 32 and len(set(one)) == 32
        for world_size in (2, 4):
            assert np.array_equal(step_union(world_size, step, epoch), one)


@pytest.mark.parametrize("workers", [0, 2])
def test_step_boundary_state_loads_on_another_world_size(fmnist, workers):
    """1 rank accumulating 4 micro-batches of 8 -> 2 ranks of 2 micro-batches with loader workers,
    mid-epoch: the same images and targets after the device-side erasing and mixing (all on), bitwise,
    on into the next epoch."""
    single = small_loader(fmnist, micro_batch=8)
    collect(single, 4)  # step 0
    state = single.state_dict()
    expected = collect(single, 12)  # steps 1 and 2 of epoch 0, step 0 of epoch 1
    ranks = []
    for rank in range(2):
        loader = small_loader(fmnist, workers, world_size=2, rank=rank, micro_batch=8)
        loader.load_state_dict(state)
        ranks.append(collect(loader, 6))
    for step in range(3):  # each rank holds a contiguous half of every step
        assert_same(ranks[0][2 * step:2 * step + 2] + ranks[1][2 * step:2 * step + 2], expected[4 * step:4 * step + 4])
    assert any(int((t > 0.05).sum()) > len(t) for _, t in expected)  # some targets are mixed, not one class each


def test_device_side_mixing_is_as_planned(fmnist):
    """Mixup blends each image with its mirror in the micro-batch by the plan's lambda, in pixels and targets;
    cutmix pastes the mirror's box; erasing fills a box with noise; normalisation uses the dataset's stats."""
    loader = small_loader(fmnist, erase_prob=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    images, plan = next(loader)
    x, targets = loader.batch_augment(images, plan)
    plain = (images.permute(0, 3, 1, 2).float() / 255 - 0.2860) / 0.3530
    assert plan.mix == "mixup" and 0 <= plan.lam <= 1
    torch.testing.assert_close(x, plan.lam * plain + (1 - plan.lam) * plain.flip(0))
    one_hot = torch.nn.functional.one_hot(plan.labels, 10).float()
    torch.testing.assert_close(targets, plan.lam * one_hot + (1 - plan.lam) * one_hot.flip(0))
    loader = small_loader(fmnist, erase_prob=0.0, mixup_alpha=0.0)
    images, plan = next(loader)
    x, _ = loader.batch_augment(images, plan)
    top, left, h, w = plan.box
    plain = (images.permute(0, 3, 1, 2).float() / 255 - 0.2860) / 0.3530
    assert plan.mix == "cutmix" and plan.lam == pytest.approx(1 - h * w / 28 ** 2)
    torch.testing.assert_close(x[:, :, top:top + h, left:left + w], plain.flip(0)[:, :, top:top + h, left:left + w])
    loader = small_loader(fmnist, erase_prob=1.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    images, plan = next(loader)
    x, _ = loader.batch_augment(images, plan)
    plain = (images.permute(0, 3, 1, 2).float() / 255 - 0.2860) / 0.3530
    top, left, h, w = plan.erase[0].tolist()
    assert h > 0 and not torch.equal(x[0, :, top:top + h, left:left + w], plain[0, :, top:top + h, left:left + w])
    outside = torch.ones(28, 28, dtype=torch.bool)
    outside[top:top + h, left:left + w] = False
    assert torch.equal(x[0, 0][outside], plain[0, 0][outside])


def test_soft_targets_from_mixup_and_cutmix(fmnist):
    for augment in (dict(), dict(mixup_alpha=0.0), dict(cutmix_alpha=0.0)):
        for images, targets in collect(small_loader(fmnist, **augment), 4):
            assert targets.shape == (8, 10) and targets.dtype == torch.float32
            assert (targets >= 0).all() and torch.allclose(targets.sum(1), torch.ones(8))
    loader = small_loader(fmnist, label_smoothing=0.0, **NO_BATCH_AUG)
    _, targets = collect(loader, 1)[0]
    labels = torch.tensor([loader.dataset.load(int(i))[1] for i in loader.cursor.step_ids(0)[:8]])
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 10).float())
    smooth = soft_targets(labels, 10, smoothing=0.1)
    assert torch.allclose(smooth.sum(1), torch.ones(8)) and torch.allclose(smooth.max(1).values, torch.tensor(0.91))


def test_loader_leaves_global_rng_alone(fmnist):
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    collect(small_loader(fmnist, workers=2), 2)
    assert torch.equal(torch.rand(3), expected)


def test_validation_shares_cover_each_image_once(fmnist):
    test = open_image_dataset(str(SAMPLE), "val")
    augment = AugmentConfig(**FMNIST)
    whole, _ = validation_batches(test, augment, micro_batch=16, limit=100)
    whole_images = torch.cat([x for x, _ in whole])
    assert whole_images.shape == (100, 28, 28, 1) and whole[0][1].dtype == torch.int64
    assert torch.equal(whole_images[5, :, :, 0], test.load(5)[0][0])  # 28 x 28 images are not resampled
    streamed = ValidationLoader(test, augment, 16, rank=1, world_size=3, limit=100, workers=2)
    assert len(streamed) == 3 and [len(y) for _, y in streamed] == [16, 16, 2]  # images 34-67
    assert torch.equal(streamed.first()[0], next(iter(streamed))[0])
    for world_size in (2, 3):
        shares = [validation_batches(test, augment, 16, rank, world_size, limit=100)[0] for rank in range(world_size)]
        assert len({len(batches) for batches in shares}) == 1
        assert torch.equal(torch.cat([x for batches in shares for x, _ in batches]), whole_images)
        assert torch.equal(torch.cat([y for batches in shares for _, y in batches]),
                           torch.cat([y for _, y in whole]))


def test_holdout_split_is_seeded_and_disjoint(fmnist):
    train, held = holdout_split(fmnist, 200, seed=1)
    again, _ = holdout_split(fmnist, 200, seed=1)
    assert (len(train), len(held)) == (1800, 200) and np.array_equal(train.indices, again.indices)
    assert sorted(np.concatenate([train.indices, held.indices]).tolist()) == list(range(2000))
    assert not np.array_equal(holdout_split(fmnist, 200, seed=2)[1].indices, held.indices)
    assert torch.equal(held.load(0)[0], fmnist.load(int(held.indices[0]))[0])


def test_make_sample_takes_the_first_images(tmp_path):
    from data_prep.make_fashion_mnist_sample import make_sample
    make_sample(SAMPLE, tmp_path, {"train": 30, "t10k": 10})
    small = open_image_dataset(str(tmp_path), "train")
    assert len(small) == 30 and np.array_equal(small.images, read_idx(SAMPLE / "train-images-idx3-ubyte.gz")[:30])
    assert (tmp_path / "README.md").is_file() and len(open_image_dataset(str(tmp_path), "test")) == 10
