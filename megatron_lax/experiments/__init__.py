"""Experiments built on the library, each also a command:

    sweep.py            learning-rate sweep (successive halving to full-length finalists)
    reproduce.py        multi-seed comparisons, each variant at its own swept learning rate
    compare.py          tables and plots of finished runs
    finetune_study.py   the CPU study of LoRA against LaX-LoRA
"""
