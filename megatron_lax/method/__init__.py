"""The method, apart from any model: low-rank linear formats and LaX.

    base.py           what a format is (`Format`: fields, validation, label, build, counts, merge)
    dense.py          the dense format (W x)
    svd.py            the SVD format (B A x)
    cola.py           the CoLA format (B act(A x)) and its field only_latent_act
    tensor_train.py   the tensor-train format (TT-matrix projections, intra-layer LaX) and its fields
    lowrank.py        the modules: DenseLinear, LatentLinear (the crossing every latent format shares),
                      LowRankLinear, the LaX gates (each with its own counts)
    formats.py        the registry FORMATS (one line per format): make_linear, projection_counts
    init.py           initialisation rules and name-seeded initial values (any build, any sharding)

Nothing here imports a model family; families build every projection through `make_linear`.
"""
from .base import Format
from .formats import FORMATS, format_of, make_linear, projection_counts, register
from .init import init_weights, module_init_rules
from .lowrank import GATES, LatentLinear, Latents

__all__ = ["FORMATS", "Format", "GATES", "format_of", "register", "LatentLinear", "Latents", "init_weights", "make_linear", "module_init_rules",
           "projection_counts"]
