"""Commands that make and prepare data, run from the repository root:

    python -m data_prep.prepare ...            tokenize text into shards (installed: megatron-lax-prepare)
    python -m data_prep.make_sample / make_corpus / make_arithmetic / make_fashion_mnist_sample

The library code (preparation, the readers) lives in megatron_lax/data/: this folder is not
installed, so the install adds no top-level package with the generic name `data_prep`.
"""
