"""Language modelling (the LLaMA family): next-token prediction on C4-format text, prepared shards
(data.source prepared) or streamed (data.source stream), scored by perplexity over a fixed
validation slice."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data import tokens as data
from ..data.streaming import Stream
from ..method.init import init_weights
from ..models import family_of
from ..parallel import ModelRecipe
from ..parallel.distributed import DistInfo, is_distributed, run_on_main
from .base import Task


class PreparedTokens:
    """Prepared shards (data/tokens.py), prepared on rank 0 first if needed (the others wait as long as
    it takes), behind the interface a streamed source (data/streaming.py Stream) has too."""

    def __init__(self, data_cfg, rank: int, world_size: int):
        run_on_main(lambda: data.ensure_prepared(data_cfg))
        self.cfg, self.rank, self.world_size = data_cfg, rank, world_size
        self.path, self.manifest = Path(data_cfg.path), data.read_manifest(data_cfg.path)

    def model_vocab_size(self, configured: int) -> int:
        return data.model_vocab_size(self.manifest, configured)

    def train_loader(self, global_batch: int, micro_batch: int, allow_repetition: bool) -> data.TrainLoader:
        return data.TrainLoader(self.path, self.cfg.seq_len, self.cfg.mode, global_batch, micro_batch, self.rank,
                                self.world_size, self.cfg.seed, allow_repetition)

    def total_steps(self, train_cfg, model_cfg, n_params: int, loader: data.TrainLoader) -> int:
        """The budget's steps, refused when the prepared data cannot supply them."""
        steps = data.resolve_steps(train_cfg, model_cfg, self.cfg.seq_len, loader.total_tokens, n_params)
        if steps > loader.steps_per_epoch and not train_cfg.allow_repetition:
            raise ValueError(f"{steps} steps need {steps * train_cfg.global_batch:,} sequences but the prepared data "
                             f"({self.cfg.mode} mode) offers {loader.sequences_per_epoch:,} per epoch; add data or "
                             f"set train.allow_repetition true")
        return steps

    def validation_batches(self, micro_batch: int, n_tokens: int, after_tokens: int = 0) -> list:
        return data.validation_batches(self.path, self.cfg.seq_len, micro_batch, n_tokens, self.cfg.mode, self.rank,
                                       self.world_size, after_tokens=after_tokens)

    def unigram_perplexity(self, n_tokens: int, after_tokens: int = 0) -> float:
        return data.unigram_perplexity(self.path, self.cfg.seq_len, self.cfg.mode, n_tokens, after_tokens=after_tokens)

    def report(self, loader) -> dict:
        return {}  # data_prep.prepare reports what it skipped when it prepares


class StreamedTokens(Stream):
    """C4-layout shards or a hub dataset tokenised as they are read (data.source stream)."""

    def total_steps(self, train_cfg, model_cfg, n_params: int, loader) -> int:
        """The budget's steps, refused when one pass cannot supply them and repetition is not allowed."""
        steps = data.planned_steps(train_cfg, model_cfg, self.cfg.seq_len, n_params)
        if steps > loader.steps_per_pass and not train_cfg.allow_repetition:
            raise ValueError(f"{steps} steps need {steps * train_cfg.global_batch:,} sequences but one pass of the "
                             f"stream ({self.cfg.mode} mode) offers {loader.steps_per_pass * train_cfg.global_batch:,} "
                             f"({loader.steps_per_pass} steps); add data or set train.allow_repetition true")
        return steps

    def report(self, loader) -> dict:
        """What the run read: sequences (and packed tokens) per source, documents skipped per reason."""
        record = {}
        for name, sequences in loader.source_sequences().items():
            key = name if len(loader.plans) > 1 else "stream"
            record[f"sequences_{key}"] = sequences
            if self.cfg.mode == "packed":
                record[f"tokens_{key}"] = sequences * self.cfg.seq_len
        skipped = loader.damage()
        record["skipped_records"] = sum(skipped.values())
        record.update({f"skipped_{reason}": n for reason, n in sorted(skipped.items())})
        return record


SOURCES = {"prepared": PreparedTokens, "stream": StreamedTokens}


class TokenPrediction(Task):
    """What language modelling and instruction tuning share: next-token NLL, scored targets (padding
    excluded), perplexity."""
    unit = "tokens"
    headline_metric = ("val_ppl", "val PPL", False)
    metric_titles = {"val_ppl": ("val PPL", False), "val_loss": ("val loss", False)}
    baseline_metric = ("unigram_ppl", "Unigram baseline")

    def loss(self, outputs, targets):
        return family_of(self.cfg.model).loss(outputs, targets)

    def scored(self, targets) -> int:
        return int(np.count_nonzero(targets.numpy() != data.IGNORE))  # host data, counted without torch

    def evaluate(self, engine, batches, seen: int = 0) -> dict:
        nll, count = self.evaluate_loss(engine, batches)
        val_loss = nll / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": count,
                **self.data_report()}

    def data_report(self) -> dict:
        """Fields the data source adds to each validation record ({}: none)."""
        return {}

    def describe_validation(self, record: dict) -> str:
        return (f"val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}  ({record['val_tokens']} tokens)"
                f"{skipped_note(record)}")

    def summarize(self, final: dict, best_val_loss: float) -> tuple[dict, str]:
        read = {k: v for k, v in final.items() if k.startswith(("sequences_", "tokens_", "skipped_"))}
        return ({"val_ppl": final["val_ppl"], "val_loss": final["val_loss"], "val_tokens": final["val_tokens"],
                 "best_val_ppl": math.exp(min(best_val_loss, 50.0)), **read},
                f"validation perplexity {final['val_ppl']:.2f} on {final['val_tokens']} tokens{skipped_note(final)}")

    @classmethod
    def evaluate_checkpoint(cls, model, cfg: Config, dist: DistInfo, data_path: str | None = None, count: int = 0,
                            micro_batch: int = 0) -> dict:
        """Validation perplexity with a 95% interval (perplexity_interval) on the run's validation tokens
        (prepared shards, or a streamed run's cached validation set), or on the shards at `data_path`."""
        n_tokens = count or cfg.train.eval_tokens or cfg.data.val_tokens
        micro_batch = micro_batch or cfg.train.micro_batch
        streamed = cfg.data.source == "stream" and not data_path  # the stream's (cached) validation set
        if streamed:
            stream = Stream(cfg.data, dist.rank, dist.world_size)
            batches = stream.validation_batches(micro_batch, n_tokens)
        else:
            if data_path:  # shards of another tokenizer would give a number that means nothing
                data.check_tokenizer(data.read_manifest(data_path), cfg.data.tokenizer, data_path)
            data_dir = data_path or cfg.data.path
            batches = data.validation_batches(data_dir, cfg.data.seq_len, micro_batch, n_tokens, cfg.data.mode,
                                              dist.rank, dist.world_size)
        result = perplexity_interval(gather_rows(sequence_nll(model, batches, dist.device)))
        unigram = stream.unigram_perplexity(n_tokens) if streamed else \
            data.unigram_perplexity(data_dir, cfg.data.seq_len, cfg.data.mode, n_tokens)
        return {"mode": cfg.data.mode, "unigram_ppl": unigram, **result}

    @classmethod
    def describe_evaluation(cls, result: dict) -> str:
        return (f"validation perplexity {result['val_ppl']:.3f} (95% interval {result['ppl_low']:.3f}-"
                f"{result['ppl_high']:.3f}, loss {result['val_loss']:.4f}) on {result['tokens']} tokens in "
                f"{result['sequences']} sequences, {result['precision']}; unigram baseline "
                f"{result['unigram_ppl']:.3f}")


def skipped_note(record: dict) -> str:
    """The streamed train split's unusable records, by reason, in a line ('' when none or not streamed)."""
    if not record.get("skipped_records"):
        return ""
    reasons = ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in sorted(record.items())
                        if k.startswith("skipped_") and k != "skipped_records")
    return f"; the train split's records skipped: {record['skipped_records']} ({reasons})"


@torch.no_grad()
def sequence_nll(model, batches, device) -> torch.Tensor:
    """(n_sequences, 2): summed NLL and scored tokens of each of this rank's sequences (the fully
    masked rows that pad a rank's share to the common batch count are left out)."""
    rows = []
    for x, y in batches:
        logits = model(x.to(device)).float()
        y = y.to(device)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=data.IGNORE, reduction="none")
        rows.append(torch.stack([nll.view_as(y).sum(1).double(), (y != data.IGNORE).sum(1).double()], dim=1))
    rows = torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=device)
    return rows[rows[:, 1] > 0]


def perplexity_interval(per_sequence: torch.Tensor, z: float = 1.96) -> dict:
    """Perplexity as exp(total NLL / total scored tokens), and a 95% interval that treats each
    validation sequence (a document in `paper` mode, a fixed-length window of the token stream in
    `packed` mode) as a unit: a delta-method interval for the ratio estimator of the mean token
    NLL, exponentiated."""
    nll, tokens = per_sequence[:, 0], per_sequence[:, 1]
    loss = float(nll.sum() / tokens.sum())
    n = len(per_sequence)
    residual = nll - loss * tokens
    stderr = math.sqrt(float(residual.pow(2).sum()) / max(n - 1, 1) / n) / float(tokens.mean()) if n > 1 else 0.0
    return {"val_loss": loss, "val_ppl": math.exp(loss), "ppl_low": math.exp(loss - z * stderr),
            "ppl_high": math.exp(loss + z * stderr), "tokens": int(tokens.sum()), "sequences": n}


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return rows
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows.cpu())
    return torch.cat(gathered)


class LanguageModeling(TokenPrediction):

    def __init__(self, cfg: Config, dist: DistInfo):
        super().__init__(cfg, dist)
        cfg, t = self.cfg, self.cfg.train
        self.source = SOURCES[cfg.data.source](cfg.data, dist.rank, dist.world_size)
        cfg.model.vocab_size = self.source.model_vocab_size(cfg.model.vocab_size)
        self.loader = self.source.train_loader(t.global_batch, t.micro_batch, t.allow_repetition)
        self.n_params = family_of(cfg.model).count_parameters(cfg.model)
        self.total_steps = self.source.total_steps(t, cfg.model, self.n_params, self.loader)

    def model(self) -> ModelRecipe:
        cfg = self.cfg
        return ModelRecipe(build=lambda: family_of(cfg.model).build(cfg.model, init_seed=None),
                           initialize=lambda model: init_weights(model, cfg.train.seed))

    def data_report(self) -> dict:
        return self.source.report(self.loader)

    @property
    def eval_tokens(self) -> int:
        return self.cfg.train.eval_tokens or self.cfg.data.val_tokens

    def validation_batches(self) -> list:
        return self.source.validation_batches(self.cfg.train.micro_batch, self.eval_tokens)

    def selection_batches(self) -> list:
        """The selection slice (train.select_tokens; none when 0): validation sequences after the reported
        ones, which LR sweeps choose on so that the reported tokens take no part in any choice."""
        t = self.cfg.train
        if not t.select_tokens:
            return []
        return self.source.validation_batches(t.micro_batch, t.select_tokens, self.eval_tokens)

    def selection_baseline(self) -> dict:
        """A run that does no better than a context-free model has learned nothing usable (the sweep's
        plateau rule)."""
        ppl = self.source.unigram_perplexity(self.cfg.train.select_tokens, self.eval_tokens)
        return {"select_chance_loss": math.log(ppl)}

    def baselines(self) -> dict:
        return {"unigram_ppl": self.source.unigram_perplexity(self.eval_tokens)}

    def describe(self, engine) -> str:
        cfg, t = self.cfg, self.cfg.train
        return (f"model: {cfg.model.method}{' + LaX (' + cfg.model.lax_gate + ')' if cfg.model.uses_lax else ''}, "
                f"{self.n_params / 1e6:.2f}M parameters; {self.total_steps} steps of {t.global_batch} x "
                f"{cfg.data.seq_len} tokens on {self.dist.world_size} rank(s), engine {cfg.parallel.engine}, "
                f"precision {engine.precision}")

    def throughput_basis(self) -> tuple[float | None, float]:
        """Packed sequences: every position is a token trained on. One document per sequence (paper):
        the scored tokens, counted each step (None), so that padding does not count as throughput."""
        cfg = self.cfg
        per_step = None if cfg.data.mode == "paper" else cfg.train.global_batch * cfg.data.seq_len
        return per_step, family_of(cfg.model).flops(cfg.model, cfg.data.seq_len)["train"]

    @classmethod
    def display_config(cls, cfg: Config) -> Config:
        """--print-config: train.steps resolved from the token budget (no data needed for that)."""
        if cfg.train.token_budget not in ("0", ""):
            cfg.train.steps = cls.planned_steps(cfg)
        return cfg

    @classmethod
    def planned_steps(cls, cfg: Config) -> int:
        """From the token budget, counted at the paper's vocabulary when the tokenizer is not yet known."""
        vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else 32000
        model = dataclasses.replace(cfg.model, vocab_size=vocab)
        return data.planned_steps(cfg.train, model, cfg.data.seq_len, family_of(model).count_parameters(model))
