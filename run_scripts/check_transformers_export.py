"""Exports runs as transformers folders and checks them where megatron_lax cannot be imported (the
figures of README "Use a trained model elsewhere"):

    python run_scripts/check_transformers_export.py RUN_DIR [RUN_DIR ...] --out export/check

For each run: `python -m megatron_lax.export`, then a child process whose path is only the
site-packages (python -S, so the editable megatron_lax is not on it) loads the folder with
AutoModelForCausalLM (AutoModelForImageClassification + pipeline for a ViT) and returns its logits and
greedy tokens (the pipeline's labels); they are compared here with our model's. LLaMA exports are
then scored by lm-evaluation-harness's Python API on the local tasks under tests/megatron_lax/lm_eval_tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "megatron_lax" / "lm_eval_tasks"
PROMPT = "The city council met on Tuesday to discuss"

CHILD = r"""
import importlib.util, json, sys, torch
assert importlib.util.find_spec("megatron_lax") is None
import transformers
folder, kind = sys.argv[1], sys.argv[2]
if kind == "llama":
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tok(sys.argv[3], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.save(model(ids).logits, folder + ".logits.pt")
        out = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    print(json.dumps({"ids": ids[0].tolist(), "greedy": out, "text": tok.decode(out, skip_special_tokens=True)}))
else:
    from PIL import Image
    classify = transformers.pipeline("image-classification", model=folder, trust_remote_code=True)
    images = [Image.open(p) for p in sys.argv[3:]]
    print(json.dumps({"labels": [classify(image, top_k=1)[0]["label"] for image in images]}))
"""


def isolated(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    done = subprocess.run([sys.executable, "-S", "-c", CHILD, *args], env=env, capture_output=True, text=True,
                          cwd="/")
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_llama(model, cfg, folder: Path) -> dict:
    from megatron_lax.generate import decode_batch
    from megatron_lax.data.tokenizer import load_tokenizer
    theirs = isolated(str(folder), "llama", PROMPT)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))
    logits = torch.load(str(folder) + ".logits.pt")
    greedy = decode_batch(model, [ids], 20, tokenizer.eos_id)[0]
    import lm_eval
    from lm_eval.tasks import TaskManager
    os.chdir(REPO)
    scores = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True",
                                     tasks=["megatron_lax_tiny_choice", "megatron_lax_tiny_perplexity"],
                                     device="cpu", batch_size=4, task_manager=TaskManager(include_path=str(TASKS)))
    return {"same_prompt_ids": theirs["ids"] == ids,
            "max_rel_logit_error": float((logits - ours).abs().max() / ours.abs().max()),
            "same_greedy_tokens": theirs["greedy"][:len(greedy)] == greedy, "greedy_text": theirs["text"],
            "lm_eval_acc": scores["results"]["megatron_lax_tiny_choice"]["acc,none"],
            "lm_eval_word_perplexity": scores["results"]["megatron_lax_tiny_perplexity"]["word_perplexity,none"]}


def check_vit(model, cfg, folder: Path) -> dict:
    import numpy as np
    from megatron_lax.data import images
    from megatron_lax.tasks.image_classification import augment_config
    dataset = images.open_image_dataset(cfg.data.path, "val")
    paths = [str(folder) + f".image{i}.png" for i in range(16)]
    for i, path in enumerate(paths):
        dataset.open(i).save(path)  # lossless: the child reads the pixels we score
    theirs = isolated(str(folder), "vit", *paths)["labels"]
    view = augment_config(cfg, train=False)
    transform = images.SampleTransform(view, dataset.channels)
    pixels = np.stack([transform.sample(dataset, i, np.random.default_rng(0))[0] for i in range(16)])
    normalize = images.BatchAugment(view, cfg.model.num_classes, dataset.channels).normalize
    with torch.no_grad():
        ours = model(normalize(torch.from_numpy(pixels))).argmax(-1).tolist()
    config = json.loads((folder / "config.json").read_text())
    return {"images": 16, "same_labels": theirs == [config["id2label"][str(i)] for i in ours]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("export/check"))
    args = parser.parse_args()
    from megatron_lax.evaluate import load_for_evaluation
    from megatron_lax.export import export
    from megatron_lax.models import family_of
    for run in args.runs:
        folder = (args.out / run.name).resolve()
        kind = export(run, folder, force=True)
        model, cfg, _, _ = load_for_evaluation(run, torch.device("cpu"))
        check = check_llama if family_of(cfg.model).uses_tokenizer else check_vit
        print(json.dumps({"run": str(run), "export": kind, "parameters": sum(p.numel() for p in model.parameters()),
                          **check(model, cfg, folder)}), flush=True)


if __name__ == "__main__":
    main()
