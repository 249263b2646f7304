"""The training core, which knows no task and no model family:

    trainer.py         the loop (step, validation, checkpoints, pause / preemption / divergence)
    checkpoint.py      atomic checkpoints agreed by every rank, verification, resume on any rank count
    optim.py           AdamW parameter groups, warmup + cosine schedule
    metrics.py         metrics.jsonl and TensorBoard
    faults.py          preemption signals (the tests inject faults from outside: tests/fault_injection.py)
    introspection.py   LaX gate values, latent RMS, MFU, peak memory
"""
