"""Shared helpers for the speed benchmarks: model configs, one training step, interleaved timing
and Markdown output.

Timing is interleaved: every round runs each contender for a few steps, in an order that rotates
from round to round, so load from other processes on a shared machine falls on all contenders
alike. We report the median tokens/s over rounds and the median of the per-round ratios (a
paired comparison, steadier than a ratio of medians under fluctuating load) with the quartiles of
those per-round ratios, so a reader can tell a real difference from noise.
"""
from __future__ import annotations

import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.models.llama import LlamaLax  # noqa: E402

# The llama_60m shapes with the short sequences a 2-core CPU can time in minutes.
SHAPES = {
    "llama_tiny": {"preset": "llama_tiny", "vocab": 8192, "seq_len": 256, "batch": 8},
    "llama_60m": {"preset": "llama_60m", "vocab": 32000, "seq_len": 128, "batch": 4},
}


def model_config(shape: str, **model_overrides):
    """The ModelConfig of a named benchmark shape, e.g. model_config("llama_60m", method="svd")."""
    spec = SHAPES[shape]
    overrides = {"model.vocab_size": spec["vocab"]}
    overrides.update({f"model.{k}": v for k, v in model_overrides.items()})
    return load_config(spec["preset"], overrides).model


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def training_step(model: torch.nn.Module, logits_of: Callable, inputs, targets,
                  fused_adamw: bool = False) -> Callable[[], None]:
    """A closure running forward + backward + AdamW step; the loss is computed identically for
    every contender (logits_of(model, inputs) -> (B, T, V) logits). The default AdamW is the one
    megatron_lax.optim builds (on CPU: torch's per-tensor loop)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused_adamw or None)

    def step():
        logits = logits_of(model, inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ours_step(model_cfg, inputs, targets, seed: int = 0, fused_adamw: bool = False) -> Callable[[], None]:
    torch.manual_seed(seed)
    model = LlamaLax(model_cfg).train()
    return training_step(model, lambda m, x: m(x), inputs, targets, fused_adamw)


def time_models(configs: dict, shape: str, rounds: int, steps_per_round: int,
                fused_adamw: bool = False) -> "Timing":
    """Interleaved training-step timing of our model at several configs (name -> ModelConfig)
    on one shared random batch of the shape's size."""
    spec = SHAPES[shape]
    vocab = next(iter(configs.values())).vocab_size
    inputs, targets = random_batch(vocab, spec["batch"], spec["seq_len"])
    steps = {name: ours_step(cfg, inputs, targets, fused_adamw=fused_adamw) for name, cfg in configs.items()}
    return time_interleaved(steps, spec["batch"] * spec["seq_len"], rounds, steps_per_round)


@dataclass
class Timing:
    tokens_per_s: dict = field(default_factory=dict)  # contender -> [tokens/s of each round]

    def median(self, name: str) -> float:
        return statistics.median(self.tokens_per_s[name])

    def ratio(self, name: str, base: str) -> float:
        """Median over rounds of name's tokens/s divided by base's tokens/s in the same round."""
        return statistics.median(a / b for a, b in zip(self.tokens_per_s[name], self.tokens_per_s[base]))

    def ratio_quartiles(self, name: str, base: str) -> tuple[float, float]:
        """First and third quartiles of the per-round ratios: how far to trust ratio()."""
        ratios = [a / b for a, b in zip(self.tokens_per_s[name], self.tokens_per_s[base])]
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        return q1, q3

    def ratio_cell(self, name: str, base: str) -> str:
        q1, q3 = self.ratio_quartiles(name, base)
        return f"{self.ratio(name, base):.3f} [{q1:.3f}, {q3:.3f}]"

    def spread(self, name: str) -> float:
        """Relative half-range of the rounds' tokens/s, a rough noise indicator."""
        values = self.tokens_per_s[name]
        return (max(values) - min(values)) / (2 * statistics.median(values))


def time_interleaved(steps: dict[str, Callable[[], None]], tokens_per_step: int, rounds: int = 8,
                     steps_per_round: int = 3, warmup: int = 2, log=print) -> Timing:
    """Tokens/s of each contender's step, measured in rotating interleaved rounds."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    timing = Timing({name: [] for name in names})
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            elapsed = time.perf_counter() - start
            timing.tokens_per_s[name].append(steps_per_round * tokens_per_step / elapsed)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {timing.tokens_per_s[n][-1]:.0f}" for n in names),
            file=sys.stderr)
    return timing


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(shlex.quote(a) for a in ["python", str(shown), *sys.argv[1:]])


def print_header(title: str) -> None:
    print(f"### {title}\n")
    print(f"Command: `{command_line()}`  ")
    print(f"Machine: {machine()}\n")
