from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="megatron-lax",
    version="0.1.0",
    description="Low-rank LLaMA pre-training with LaX (Latent Crossing), from one CPU to multi-node ZeRO/FSDP2",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Only megatron_lax: tokenizer/ and data_prep/ hold commands run from the repository root (python -m
    # tokenizer.train, python -m data_prep.prepare) over code in megatron_lax/data/, and are not installed
    # under their generic names (other packages on PyPI are called `tokenizer`).
    packages=find_packages(include=["megatron_lax", "megatron_lax.*"]),
    install_requires=requirements,
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        "hf": ["transformers>=4.45", "datasets"],
        "stream": ["datasets>=3.0", "transformers>=4.45"],  # data.source stream: the hub's datasets, t5-base
        "finetune": ["peft"],
        "eval": ["transformers>=4.45", "lm-eval>=0.4"],  # exports scored by lm-evaluation-harness
        "test": ["pytest", "deepspeed>=0.16", "transformers>=4.45", "datasets>=3.0", "matplotlib", "peft", "lm-eval>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "megatron-lax-train=megatron_lax.train:main",
            "megatron-lax-info=megatron_lax.info:main",
            "megatron-lax-evaluate=megatron_lax.evaluate:main",
            "megatron-lax-export=megatron_lax.export:main",
            "megatron-lax-generate=megatron_lax.generate:main",
            "megatron-lax-compare=megatron_lax.experiments.compare:main",
            "megatron-lax-sweep=megatron_lax.experiments.sweep:main",
            "megatron-lax-reproduce=megatron_lax.experiments.reproduce:main",
            "megatron-lax-finetune=megatron_lax.finetune:main",
            "megatron-lax-finetune-eval=megatron_lax.finetune_eval:main",
            "megatron-lax-prepare=megatron_lax.data.prepare:main",
            "megatron-lax-tokenizer=megatron_lax.data.train_tokenizer:main",
        ],
    },
)
