"""The paper's tables that the code reads, in one place (arXiv 2505.21732): presets, token budgets,
the run scripts' recipes and the tests all take them from here.

Table 14: LLaMA pre-training on C4 per scale: the GaLore/CoLA shapes and ranks, steps and warmup
(512 sequences of 256 tokens per step) and the peak learning rate of each variant.
Tables 9-10: ViT-B / ViT-L on ImageNet-1k: ranks and learning rates.
"""
from __future__ import annotations

from typing import NamedTuple


class LlamaScale(NamedTuple):
    preset: str
    dim: int
    ffn_dim: int
    n_heads: int
    n_layers: int
    rank: int
    steps: int
    warmup: int
    lr: dict  # (method, with LaX) -> peak LR; ("dense", False): GaLore's full-rank baselines
    # CoLA's MLP, as CoLA's configs build it: 60M and 130M keep the SwiGLU's own SiLU (only_lr_act false);
    # 350M and 1B leave only_lr_act at its default, true (model.only_latent_act)
    cola_only_latent_act: bool


TABLE_14 = {
    "60m": LlamaScale("llama_60m", 512, 1376, 8, 8, 128, 10_000, 2_000,
                      {("svd", False): 2e-3, ("svd", True): 2e-2, ("cola", False): 6e-3, ("cola", True): 4e-2,
                       ("dense", False): 1e-3}, False),
    "130m": LlamaScale("llama_130m", 768, 2048, 12, 12, 256, 20_000, 4_000,
                       {("svd", False): 1e-3, ("svd", True): 1e-2, ("cola", False): 4e-3, ("cola", True): 2e-2,
                        ("dense", False): 1e-3}, False),
    "350m": LlamaScale("llama_350m", 1024, 2736, 16, 24, 256, 60_000, 12_000,
                       {("svd", False): 1e-3, ("svd", True): 1e-2, ("cola", False): 3e-3, ("cola", True): 2e-2,
                        ("dense", False): 1e-3}, True),
    "1b": LlamaScale("llama_1b", 2048, 5461, 32, 24, 512, 100_000, 20_000,
                     {("svd", False): 8e-4, ("svd", True): 3e-3, ("cola", False): 2e-3, ("cola", True): 1e-2,
                      ("dense", False): 1e-3}, True),
}
SEQUENCES_PER_STEP, SEQ_LEN = 512, 256
TOKENS_PER_STEP = SEQUENCES_PER_STEP * SEQ_LEN
# `train.token_budget paper` is Table 14's steps x 512 x 256 tokens, found by the model's width. (The
# 1.1B/2.2B/6.4B/13.1B figures quoted with Table 5 are GaLore's, and disagree with these step counts.)
STEPS_BY_DIM = {scale.dim: scale.steps for scale in TABLE_14.values()}


class ViTScale(NamedTuple):
    preset: str
    rank: int  # SVD and CoLA
    tt_ranks: tuple[int, int, int]  # tensor train: attention, fc1, fc2
    fc2_modes: str  # the TT fc2 modes the official code uses
    # The TT MLP ranks are not in the tables: the official code gives its MLPs the rank its rank rule
    # yields (method.tensor_train.official_rank) at its own modes, which for ViT-B's fc2 are 48,64 | 32,24
    # (Table 13 prints 48,64 | 24,32). With them every Table 1 count is the official model's (docs/VISION.md).


TABLES_9_10 = {"vit_b": ViTScale("vit_b", 256, (336, 158, 159), "48,64,32,24"),
               "vit_l": ViTScale("vit_l", 256, (256, 198, 198), "64,64,32,32")}
VIT_LR = {False: 3e-3, True: 1e-3}  # by whether the format is low-rank (any format, with or without LaX)
VIT_EPOCHS, VIT_WARMUP_EPOCHS, VIT_WEIGHT_DECAY, VIT_DROPOUT = 300, 10, 0.3, 0.1
IMAGENET_TRAIN_IMAGES = 1_281_167
