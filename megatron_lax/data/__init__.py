"""Training data, one module per kind, each with its exact-resume loader over one global-batch
cursor (cursor.py):

    tokens.py         prepared C4-format token shards (memory-mapped): packed / paper sequences, budgets
    images.py         image class folders and Fashion-MNIST, augmentation
    instructions.py   instruction records (LLM-Adapters layout), tokenised and padded
    tokenizer.py      the one tokenizer loader; train_tokenizer.py trains one (python -m tokenizer.train)
    prepare.py        text into prepared shards (python -m data_prep.prepare); readers.py reads the inputs
"""
