"""The repository's tokenizers (sample/, english/) and the command that trains one:

    python -m tokenizer.train ...      (from the repository root; installed: megatron-lax-tokenizer)

The code lives in the package (megatron_lax/data/tokenizer.py, train_tokenizer.py): this folder is
not installed, so the install adds no top-level package with the generic name `tokenizer`.
"""
