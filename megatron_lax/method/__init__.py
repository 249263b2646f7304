"""The method, apart from any model: low-rank linear formats and LaX.

    lowrank.py        dense / SVD / CoLA projections, the LaX gates and the crossing
    tensor_train.py   tensor-train (TT-matrix) projections with inter- and intra-layer LaX
    formats.py        the registry of formats: make_linear, projection_counts
    init.py           initialisation rules and name-seeded initial values (any build, any sharding)

Nothing here imports a model family; families build every projection through `make_linear`.
"""
from .formats import FORMATS, make_linear, projection_counts
from .init import init_weights, module_init_rules
from .lowrank import GATES, LatentLinear, Latents

__all__ = ["FORMATS", "GATES", "LatentLinear", "Latents", "init_weights", "make_linear", "module_init_rules",
           "projection_counts"]
