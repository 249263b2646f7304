"""Model families (LLaMA, ViT) built over one low-rank core (lowrank.py, tensor_train.py)."""
