"""Language modelling (the LLaMA family): next-token prediction on prepared C4-format shards,
scored by perplexity over a fixed validation slice."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from ..config import Config
from ..data import tokens as data
from ..method.init import init_weights
from ..models.llama import LlamaLax, count_parameters, flops_per_token, token_nll
from ..parallel import ModelRecipe
from ..parallel.distributed import DistInfo, run_on_main
from ..training import faults
from .base import Task


def prepare_data(cfg: Config, dist: DistInfo) -> tuple[Path, dict]:
    """Prepares the shards on rank 0 if needed (the others wait as long as it takes); (their
    directory, their manifest)."""
    def prepare():
        time.sleep(faults.SLOW_PREPARE)  # the tests' stand-in for a long preparation
        data.ensure_prepared(cfg.data)
    run_on_main(prepare)
    return Path(cfg.data.path), data.read_manifest(cfg.data.path)


class TokenPrediction(Task):
    """What language modelling and instruction tuning share: next-token NLL, scored targets (padding
    excluded), perplexity."""
    unit = "tokens"
    headline_metric = ("val_ppl", "val PPL", False)

    def loss(self, outputs, targets):
        return token_nll(outputs, targets)

    def scored(self, targets) -> int:
        return int((targets != data.IGNORE).sum())

    def evaluate(self, engine, batches, seen: int = 0) -> dict:
        nll, count = self.evaluate_loss(engine, batches)
        val_loss = nll / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": count}

    def describe_validation(self, record: dict) -> str:
        return f"val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}  ({record['val_tokens']} tokens)"

    def summarize(self, final: dict, best_val_loss: float) -> tuple[dict, str]:
        return ({"val_ppl": final["val_ppl"], "val_loss": final["val_loss"], "val_tokens": final["val_tokens"],
                 "best_val_ppl": math.exp(min(best_val_loss, 50.0))},
                f"validation perplexity {final['val_ppl']:.2f} on {final['val_tokens']} tokens")


class LanguageModeling(TokenPrediction):

    def __init__(self, cfg: Config, dist: DistInfo):
        super().__init__(cfg, dist)
        cfg, t = self.cfg, self.cfg.train
        self.data_path, manifest = prepare_data(cfg, dist)
        cfg.model.vocab_size = data.model_vocab_size(manifest, cfg.model.vocab_size)
        self.loader = data.TrainLoader(self.data_path, cfg.data.seq_len, cfg.data.mode, t.global_batch,
                                       t.micro_batch, dist.rank, dist.world_size, cfg.data.seed, t.allow_repetition)
        self.n_params = count_parameters(cfg.model)
        self.total_steps = data.resolve_steps(t, cfg.model, cfg.data.seq_len, self.loader.total_tokens, self.n_params)
        if self.total_steps > self.loader.steps_per_epoch and not t.allow_repetition:
            raise ValueError(f"{self.total_steps} steps need {self.total_steps * t.global_batch:,} sequences but the "
                             f"prepared data ({cfg.data.mode} mode) offers {self.loader.sequences_per_epoch:,} per "
                             f"epoch; add data or set train.allow_repetition true")

    def model(self) -> ModelRecipe:
        cfg = self.cfg
        return ModelRecipe(build=lambda: LlamaLax(cfg.model, init_seed=None),
                           initialize=lambda model: init_weights(model, cfg.train.seed))

    @property
    def eval_tokens(self) -> int:
        return self.cfg.train.eval_tokens or self.cfg.data.val_tokens

    def validation_batches(self) -> list:
        cfg = self.cfg
        return data.validation_batches(self.data_path, cfg.data.seq_len, cfg.train.micro_batch, self.eval_tokens,
                                       cfg.data.mode, self.dist.rank, self.dist.world_size)

    def selection_batches(self) -> list:
        """The selection slice (train.select_tokens; none when 0): validation sequences after the reported
        ones, which LR sweeps choose on so that the reported tokens take no part in any choice."""
        cfg = self.cfg
        if not cfg.train.select_tokens:
            return []
        return data.validation_batches(self.data_path, cfg.data.seq_len, cfg.train.micro_batch,
                                       cfg.train.select_tokens, cfg.data.mode, self.dist.rank, self.dist.world_size,
                                       after_tokens=self.eval_tokens)

    def selection_baseline(self) -> dict:
        """A run that does no better than a context-free model has learned nothing usable (the sweep's
        plateau rule)."""
        cfg = self.cfg
        ppl = data.unigram_perplexity(self.data_path, cfg.data.seq_len, cfg.data.mode, cfg.train.select_tokens,
                                      after_tokens=self.eval_tokens)
        return {"select_chance_loss": math.log(ppl)}

    def baselines(self) -> dict:
        cfg = self.cfg
        return {"unigram_ppl": data.unigram_perplexity(self.data_path, cfg.data.seq_len, cfg.data.mode,
                                                       self.eval_tokens)}

    def describe(self, engine) -> str:
        cfg, t = self.cfg, self.cfg.train
        return (f"model: {cfg.model.method}{' + LaX (' + cfg.model.lax_gate + ')' if cfg.model.uses_lax else ''}, "
                f"{self.n_params / 1e6:.2f}M parameters; {self.total_steps} steps of {t.global_batch} x "
                f"{cfg.data.seq_len} tokens on {self.dist.world_size} rank(s), engine {cfg.parallel.engine}, "
                f"precision {engine.precision}")

    def throughput_basis(self) -> tuple[float, float]:
        cfg = self.cfg
        return cfg.train.global_batch * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len)["train"]

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
        return data.planned_steps(cfg.train, model, cfg.data.seq_len, count_parameters(model))
