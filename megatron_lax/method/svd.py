"""The SVD format: y = B A x through a rank-r latent (lowrank.LowRankLinear), which LaX crosses."""
from __future__ import annotations

from .base import Format
from .lowrank import LowRankLinear, latent_saved_bytes


class SVD(Format):
    name, label = "svd", "SVD"
    export = "transformers"  # hub/ copies this class (and HF_SOURCE) into a transformers export
    # model.lowrank_init auto: from the widest width measured in docs/RESULTS.md ("Initialisation"):
    # SVD's better init flips from matched at width 128 to cola at 256.
    default_lowrank_init = "cola"
    latent_activation = False  # CoLA puts the family's activation on the latent

    def build(self, cfg, projection, d_in, d_out, bias, activation, crossing):
        act = activation if self.latent_activation else None
        return LowRankLinear(d_in, d_out, cfg.rank_of(projection), act, bias=bias, **crossing)

    def count(self, cfg, projection, d_in, d_out):
        r = cfg.rank_of(projection)
        return r * (d_in + d_out), 2 * r * (d_in + d_out), r

    def saved_bytes(self, cfg, projection, d_in, d_out, layer, mode, act_bytes):
        """A x saves only the input; the rest is the latent part (lowrank.latent_saved_bytes)."""
        return latent_saved_bytes(cfg, cfg.rank_of(projection), layer, projection, self.latent_activation, mode,
                                  act_bytes)

    def kept_flops(self, cfg, projection, d_in, d_out):
        return 2 * d_in * cfg.rank_of(projection)  # A x (LowRankLinear.kept_matmul)

    def mergeable(self, cfg) -> bool:
        return not cfg.uses_lax  # W = B A; a crossing makes a projection depend on the block before
