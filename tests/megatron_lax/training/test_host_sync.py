"""No step of the training loop reads a device value back on the host except at logging steps (and
validation, checkpoints): on a GPU each such read stalls the CPU until the GPU has finished."""
from __future__ import annotations

from pathlib import Path

from megatron_lax.config import load_config
from megatron_lax.train import make_trainer
from megatron_lax.training.trainer import fit_counting_per_step
from megatron_lax.training.introspection import counting_host_reads

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "fashion_mnist_sample"


def host_reads_per_step(cfg) -> dict[int, int]:
    """{step: host reads during that step} over a whole fit()."""
    with counting_host_reads() as reads:
        return fit_counting_per_step(make_trainer(cfg), lambda: reads["count"])[1]


def test_language_model_steps_between_logging_steps_read_nothing_back(tiny_overrides, tmp_path):
    cfg = load_config("llama_tiny", tiny_overrides(tmp_path, model__method="cola", model__lax_gate="dense",
                                                   train__steps=8, train__eval_every=4, logging__log_every=4,
                                                   logging__lax_stats_every=4, data__mode="paper",
                                                   train__global_batch=8, train__micro_batch=4))
    per_step = host_reads_per_step(cfg)
    assert [per_step[s] for s in (1, 2, 3, 5, 6, 7)] == [0] * 6, per_step
    assert per_step[4] > 0  # a logging step reads its record (the counter counts)


def test_image_steps_with_erasing_and_mixing_read_nothing_back(tmp_path):
    cfg = load_config("vit_micro", {
        "model.dim": "32", "model.n_layers": "2", "model.n_heads": "2", "model.ffn_dim": "64", "model.rank": "8",
        "model.patch_size": "7", "model.method": "svd", "model.lax_gate": "tensor", "data.path": str(SAMPLE),
        "data.train_images": "64", "data.val_images": "8", "augment.random_erasing": "1.0",
        "train.steps": "6", "train.global_batch": "8", "train.micro_batch": "4", "logging.log_every": "3",
        "logging.progress": "false", "logging.tensorboard": "false", "logging.run_dir": str(tmp_path)})
    per_step = host_reads_per_step(cfg)
    # step 1 opens the epoch's DataLoader, which draws its base seed with .item() of a CPU tensor: host data
    assert [per_step[s] for s in (2, 4, 5)] == [0] * 3, per_step
