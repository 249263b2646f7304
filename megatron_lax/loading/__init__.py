"""Loading models, by job:

    ours.py          our pre-training checkpoints (any engine, any family) and our exports
    huggingface.py   Hugging Face LLaMA directories as our dense LLaMA, and our weights under their names
    bases.py         a fine-tuning base: its kind, tokenizer, dense model and weights fingerprint
    finetuned.py     fine-tuning runs (adapters on their base), LaX-LoRA exports, sharded HF bases;
                     load_any: whatever a path holds
"""
