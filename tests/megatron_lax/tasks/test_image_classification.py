"""The ViT training loop (megatron_lax.vision) on the shipped Fashion-MNIST sample: it learns, resumes
exactly, matches one process on 2 ranks with FSDP2 and ZeRO-3, keeps held-out images out of
training, counts unreadable images, and `evaluate` reports a checkpoint's accuracy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, losses, run_command

sys.path.insert(0, str(Path(__file__).parents[1] / "parallel"))  # the multi-run launcher the engine tests use
from train_runs import launch, run_all  # noqa: E402

SAMPLE = REPO / "data" / "fashion_mnist_sample"
VIT_TINY = {
    "model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.ffn_dim": 64, "model.rank": 8,
    "model.patch_size": 7, "model.method": "svd", "model.lax_gate": "tensor", "model.dropout": 0.1,
    "data.path": SAMPLE, "data.train_images": 160, "data.val_images": 48,
    "augment.randaugment_n": 1, "augment.crop_scale_min": 0.5,  # mixup, cutmix, erasing: the defaults (on)
    "train.steps": 4, "train.global_batch": 16, "train.micro_batch": 4, "optim.lr": 3e-3,
    "logging.log_every": 1, "logging.lax_stats_every": 2, "logging.progress": False, "logging.tensorboard": False,
    "checkpoint.every": 2,
}


def vit_run(run_dir: Path, **extra) -> dict:
    return {"preset": "vit_micro", "overrides": {**VIT_TINY, "logging.run_dir": run_dir,
                                                 **{k.replace("__", "."): v for k, v in extra.items()}}}


def final_record(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_acc1" in r][-1]


def assert_close_losses(got: dict, expected: dict, rel: float) -> None:
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=rel), step


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit_single")
    run_all([vit_run(out / "full"), vit_run(out / "resumed", checkpoint__resume=out / "full" / "checkpoints" / "step_00000002"),
             vit_run(out / "no_dropout", model__dropout=0.0)])
    return out


def test_run_validates_with_accuracy_and_resumes_exactly(single):
    full, resumed = losses(single / "full"), losses(single / "resumed")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert_close_losses(resumed, {s: full[s] for s in (3, 4)}, rel=1e-6)
    record = final_record(single / "full")
    assert record["val_images"] == 48 and 0 <= record["val_acc1"] <= record["val_acc5"] <= 100
    assert (single / "full" / "finished.json").is_file()


def test_two_ranks_with_fsdp2_and_zero3_match_one_process(single, tmp_path):
    """Without dropout (its masks come from each rank's own random stream); augmentation included."""
    launch([vit_run(tmp_path / "fsdp", parallel__engine="fsdp", model__dropout=0.0),
            vit_run(tmp_path / "zero3", parallel__engine="deepspeed", parallel__zero_stage=3, model__dropout=0.0)],
           tmp_path, nproc=2)
    expected = losses(single / "no_dropout")
    for engine in ("fsdp", "zero3"):
        assert_close_losses(losses(tmp_path / engine), expected, rel=1e-5)
        assert final_record(tmp_path / engine)["val_acc1"] == pytest.approx(final_record(single / "no_dropout")["val_acc1"])


def test_training_learns(tmp_path):
    run_all([vit_run(tmp_path / "run", train__steps=80, augment__mixup=0, augment__cutmix=0, augment__random_erasing=0,
                     augment__randaugment_n=0, checkpoint__every=0, train__eval_every=0, optim__lr=1e-2,
                     model__dropout=0.0)])
    curve = losses(tmp_path / "run")
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (78, 79, 80)) / 3
    assert last < first - 0.25
    assert final_record(tmp_path / "run")["val_acc1"] > 30  # chance is 10


def test_held_out_images_are_never_trained_on():
    from megatron_lax.config import load_config
    from megatron_lax.tasks.image_classification import open_splits
    cfg = load_config("vit_micro", {"data.path": str(SAMPLE), "data.train_images": "500", "data.holdout": "100",
                                    "data.eval_split": "holdout"})
    train, holdout = open_splits(cfg.data)
    assert (len(train), len(holdout)) == (400, 100)
    assert not set(train.indices.tolist()) & set(holdout.indices.tolist())
    again, _ = open_splits(load_config("vit_micro", {"data.path": str(SAMPLE), "data.train_images": "500",
                                                     "data.holdout": "100", "data.seed": "5"}).data)
    assert again.indices.tolist() == train.indices.tolist()  # the same slice whatever the data seed


def make_folder_dataset(root: Path) -> None:
    """3 classes of small RGB images, one truncated JPEG among them."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("cat", "dog", "fox"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                size = (30 + i, 36)
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    bad = root / "train" / "dog" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:40])


def test_unreadable_images_are_skipped_counted_and_printed(tmp_path, capsys):
    """36 training images, one unreadable, in steps of 12: two epochs read it twice and train on 70."""
    make_folder_dataset(tmp_path / "images")
    run_all([vit_run(tmp_path / "run", data__path=tmp_path / "images", data__train_images=0, data__val_images=0,
                     model__image_size=28, model__patch_size=7, train__steps=6, train__global_batch=12,
                     train__eval_every=3, checkpoint__every=0)])
    record = final_record(tmp_path / "run")
    assert (record["skipped_images"], record["skipped_train_images"], record["skipped_val_images"]) == (2, 2, 0)
    assert record["val_images"] == 12 and record["images"] == 70 and record["epochs"] == 2.0
    out = capsys.readouterr().out
    assert "(12 images); 1 unreadable images skipped (1 training, 0 validation)" in out  # step 3
    assert "(12 images); 2 unreadable images skipped (2 training, 0 validation)" in out  # step 6
    assert "2.00 epochs of the readable training images; 2 unreadable images skipped (2 training, 0 validation)" in out


def test_evaluate_reports_the_checkpoint_accuracy(single):
    result = run_command([sys.executable, "-m", "megatron_lax.evaluate", "--checkpoint", str(single / "full"), "--json"])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["val_acc1"] == pytest.approx(final_record(single / "full")["val_acc1"])
    assert report["val_images"] == 48 and report["step"] == 4


def test_a_vit_export_loads_back_in_evaluate_and_generate_refuses_it(single, tmp_path, capsys):
    from megatron_lax import generate
    from megatron_lax.evaluate import evaluate_checkpoint
    from megatron_lax.export import export
    assert export(single / "full", tmp_path / "vit", fmt="megatron_lax") == "megatron_lax"
    exported, checkpoint = evaluate_checkpoint(tmp_path / "vit"), evaluate_checkpoint(single / "full")
    assert exported["step"] == checkpoint["step"] == 4
    assert {k: exported[k] for k in ("val_acc1", "val_loss", "val_images")} == \
        {k: checkpoint[k] for k in ("val_acc1", "val_loss", "val_images")}
    assert generate.main(["--checkpoint", str(tmp_path / "vit"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'vit'} holds a vit image classifier, which "
                                               f"generates no text (python -m megatron_lax.evaluate scores it)")


def test_a_vit_export_classifies_through_the_transformers_pipeline(single, tmp_path):
    """export's default for a ViT: an AutoModelForImageClassification folder whose image processor
    gives the evaluation view ours gives (here of a 40x34 image, resized and centre-cropped), whose
    logits are ours, and which pipeline() labels as our model does."""
    import numpy as np
    import torch
    from PIL import Image
    transformers = pytest.importorskip("transformers")
    from megatron_lax.data import images
    from megatron_lax.evaluate import load_for_evaluation
    from megatron_lax.export import export
    from megatron_lax.tasks.image_classification import augment_config
    assert export(single / "full", tmp_path / "vit_hf") == "transformers image classifier (remote code)"
    ours, cfg, _, _ = load_for_evaluation(single / "full", torch.device("cpu"))
    dataset = images.open_image_dataset(str(SAMPLE), "val")
    pictures = [dataset.open(i).convert("L").resize((40, 34), Image.Resampling.BILINEAR) for i in range(4)]

    class Pictures:  # the evaluation transform's view of these pictures
        def label(self, i):
            return 0

        def open(self, i):
            return pictures[i].copy()
    transform = images.SampleTransform(augment_config(cfg, train=False), dataset.channels)
    view = np.stack([transform.sample(Pictures(), i, np.random.default_rng(0))[0] for i in range(4)])
    normalize = images.BatchAugment(augment_config(cfg, train=False), cfg.model.num_classes, dataset.channels).normalize
    with torch.no_grad():
        expected = ours(normalize(torch.from_numpy(view)))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "vit_hf", trust_remote_code=True)
    theirs = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "vit_hf", trust_remote_code=True)
    with torch.no_grad():
        logits = theirs(**processor(pictures, return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "vit_hf"), trust_remote_code=True)
    labels = [classify(picture, top_k=1)[0]["label"] for picture in pictures]
    assert labels == [theirs.config.id2label[int(i)] for i in expected.argmax(-1)]


def test_info_prints_the_vit_counts():
    result = run_command([sys.executable, "-m", "megatron_lax.info", "--config", "vit_b", "--model.method", "svd",
                          "--model.lax_gate", "tensor", "--json"])
    info = json.loads(result.stdout)
    assert int(info["params"] / 1e4) / 100 == pytest.approx(44.24)


def test_three_ranks_with_uneven_validation_match_one_process(tmp_path):
    """DDP on 3 ranks, 50 validation images (17, 17, 16 a rank, padded with an empty batch), 24 images a
    step: the losses and the accuracy of one process."""
    settings = dict(model__dropout=0.0, train__global_batch=24, data__val_images=50, checkpoint__every=0, train__steps=3)
    run_all([vit_run(tmp_path / "single", **settings)])
    launch([vit_run(tmp_path / "ddp", parallel__engine="ddp", **settings)], tmp_path, nproc=3)
    assert_close_losses(losses(tmp_path / "ddp"), losses(tmp_path / "single"), rel=1e-5)
    got, expected = final_record(tmp_path / "ddp"), final_record(tmp_path / "single")
    assert got["val_images"] == expected["val_images"] == 50
    assert got["val_acc1"] == pytest.approx(expected["val_acc1"]) and got["val_loss"] == pytest.approx(expected["val_loss"])


def test_resume_with_loader_workers_on_three_ranks_matches_one_process(tmp_path):
    """Two loader workers per rank and the device-side erasing, mixup and cutmix (all on): a run
    checkpointed at step 2 on one process and resumed on 3 ranks (DDP) takes the steps the
    uninterrupted run took."""
    settings = dict(model__dropout=0.0, train__global_batch=24, data__loader_workers=2)
    run_all([vit_run(tmp_path / "single", **settings)])
    launch([vit_run(tmp_path / "ddp", parallel__engine="ddp", **settings,
                    checkpoint__resume=tmp_path / "single" / "checkpoints" / "step_00000002")], tmp_path, nproc=3)
    single, resumed = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(resumed) == [3, 4]
    assert_close_losses(resumed, {s: single[s] for s in (3, 4)}, rel=1e-5)
    assert final_record(tmp_path / "ddp")["val_acc1"] == pytest.approx(final_record(tmp_path / "single")["val_acc1"])
