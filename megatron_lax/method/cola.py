"""The CoLA format: y = B act(A x), the family's activation on the latent (SiLU for LLaMA, GELU for
the ViT). Its own field, model.only_latent_act, drops a LLaMA MLP's activation in favour of the
latent one (CoLA's only_lr_act)."""
from __future__ import annotations

from dataclasses import dataclass

from .svd import SVD


@dataclass
class CoLAFields:
    only_latent_act: bool = False  # cola: the MLP drops its own activation; the latent one is the only one (CoLA's only_lr_act)


class CoLA(SVD):
    name, label, fields = "cola", "CoLA", CoLAFields
    default_lowrank_init = "matched"  # docs/RESULTS.md ("Initialisation"): matched at both widths measured
    latent_activation = True

    def validate_unused(self, m) -> None:
        if m.only_latent_act:
            raise ValueError(f"model.only_latent_act drops the MLP's activation in favour of CoLA's latent one; it "
                             f"needs model.method cola, not {m.method!r}")

    def mergeable(self, cfg) -> bool:
        return False


HF_SOURCE = ("CoLAFields",)  # what a transformers export copies from here beside the CoLA class (megatron_lax/hub/)
