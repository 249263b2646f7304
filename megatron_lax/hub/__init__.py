"""A LLaMA-family model of any format as a Hugging Face transformers folder (`export`'s default for the
models a plain LlamaForCausalLM cannot hold: SVD + LaX, CoLA, LaX-LoRA):

    config.json                 transformers' LLaMA shapes, the format and LaX fields, auto_map
    modeling_megatron_lax.py    the model, written from the package's own code (hub/llama.py
                                and the source of the layers it imports): torch and transformers only
    model*.safetensors          weights, sharded with an index above --max-shard-size
    generation_config.json, tokenizer.json / tokenizer_config.json (+ tokenizer.model), README.md

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

The code in the folder always comes from the installed package, never from the checkpoint.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import math
import shutil
from pathlib import Path

import torch

from ..config import Config, dump_yaml
from ..loading.transformers_export import EXPORT_MARKER
from ..method.formats import FORMATS
from . import llama as llama_hf, vit as vit_hf

MODELING_FILE = "modeling_megatron_lax.py"
PACKAGE_SECTION = "# --- megatron_lax: the export writes these objects' source here ---\n"
MODEL_SECTION = "# --- the transformers model ---\n"
AUTO_MAP = {"AutoConfig": "modeling_megatron_lax.MegatronLaxLlamaConfig",
            "AutoModelForCausalLM": "modeling_megatron_lax.MegatronLaxForCausalLM"}


# --- the modeling file ------------------------------------------------------------------------------

def top_level_source(module, name: str) -> str:
    """The source of one top-level class, function or assignment of `module`, as written there."""
    source = inspect.getsource(module)
    for node in ast.parse(source).body:
        names = [node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else [
            t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        if name in names:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            return "\n".join(source.splitlines()[first - 1:node.end_lineno])
    raise ValueError(f"{module.__name__} has no top-level {name}")


def package_objects(template, method: str) -> list[tuple[object, list[str]]]:
    """(module, names in the module's order) for every package object the modeling file needs: the
    format's class and those it derives from (method/base.py's Format first), each file's HF_SOURCE
    (lowrank.py's: the gates and the crossing), and what the template (hub/llama.py,
    hub/vit.py) imports from the package."""
    from ..method import base, lowrank
    wanted: dict = {base: [], lowrank: list(lowrank.HF_SOURCE)}
    for cls in reversed(type(FORMATS[method]).__mro__[:-1]):  # Format ... the format's class
        module = inspect.getmodule(cls)
        names = wanted.setdefault(module, [])
        names += [n for n in getattr(module, "HF_SOURCE", ()) + (cls.__name__,) if n not in names]
    section = inspect.getsource(template).split(PACKAGE_SECTION)[1].split(MODEL_SECTION)[0]
    for node in ast.parse(section).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            module = importlib.import_module("." * node.level + (node.module or ""), template.__package__)
            taken = {n for names in wanted.values() for n in names}
            wanted.setdefault(module, [])
            wanted[module] += [alias.name for alias in node.names if alias.name != "FORMATS" and alias.name not in taken]

    def position(module, name):
        return inspect.getsource(module).find(top_level_source(module, name))
    return [(m, sorted(names, key=lambda n: position(m, n))) for m, names in wanted.items() if names]


def modeling_source(method: str, template=llama_hf) -> str:
    """The text of the modeling file for a model of format `method` from `template`."""
    source = inspect.getsource(template)
    head, rest = source.split(PACKAGE_SECTION)
    body = rest.split(MODEL_SECTION)[1]
    docstring = " ".join(ast.get_docstring(ast.parse(source)).split("\n\n")[0].split()).rstrip(".")
    imports = "\n".join(head.splitlines()[ast.parse(source).body[0].end_lineno:])
    from importlib.metadata import version
    parts = [f'"""{docstring} (format {method}).\n\nWritten by megatron_lax {version("megatron_lax")} '
             f'(python -m megatron_lax.export) out of\n{template.__name__.replace(".", "/")}.py and the package code '
             f'it uses, copied below as it is there; it imports nothing\nfrom megatron_lax. Load it with '
             f'from_pretrained(DIR, trust_remote_code=True).\n"""\n' + imports]
    objects = package_objects(template, method)
    sources = {(module, name): top_level_source(module, name) for module, names in objects for name in names}
    formats = {key for key in sources if is_format_class(getattr(key[0], key[1]))}
    methods = used_methods([text for key, text in sources.items() if key not in formats] + [body],
                           [sources[key] for key in formats])
    for module, names in objects:
        parts.append(f"# --- from {module.__name__.replace('.', '/')}.py ---\n")
        parts += [(without_methods(sources[module, name], methods) if (module, name) in formats else
                   sources[module, name]) + "\n\n" for name in names]
    parts.append(f"FORMATS = {{{method!r}: {type(FORMATS[method]).__name__}()}}\n")
    return "\n".join(parts) + MODEL_SECTION + body


def is_format_class(obj) -> bool:
    from ..method.base import Format
    return inspect.isclass(obj) and issubclass(obj, Format)


def used_methods(model_sources: list[str], format_sources: list[str]) -> set[str]:
    """The Format methods an export calls: the attributes the model's code reads (`.build`), then, from
    those methods, every `self.name` they read, until nothing is added. The rest (counts, validation, the
    memory plan's `saved_bytes`) is training-side code that would call helpers the file does not hold."""
    def attributes(tree, of_self: bool = False) -> set[str]:
        return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and (not of_self or isinstance(n.value, ast.Name) and n.value.id == "self")}
    reads: dict[str, set[str]] = {}  # a method's name -> the self.X its definitions read (a base's and an override's)
    for text in format_sources:
        for f in ast.parse(text).body[0].body:
            if isinstance(f, ast.FunctionDef):
                reads.setdefault(f.name, set()).update(attributes(f, of_self=True))
    wanted = set().union(*(attributes(ast.parse(text)) for text in model_sources)) & reads.keys()
    while True:
        more = set().union(*(reads[name] for name in wanted)) & reads.keys()
        if more <= wanted:
            return wanted
        wanted |= more


def without_methods(class_source: str, keep: set[str]) -> str:
    """`class_source` without the methods that are not in `keep` (dunder methods always stay)."""
    lines = class_source.splitlines()
    node = ast.parse(class_source).body[0]
    for f in reversed(node.body):
        if isinstance(f, ast.FunctionDef) and f.name not in keep and not f.name.startswith("__"):
            first = min([f.lineno] + [d.lineno for d in f.decorator_list])
            last = f.end_lineno + (f.end_lineno < len(lines) and not lines[f.end_lineno].strip())
            del lines[first - 1:last]
    text = "\n".join(lines).rstrip()
    return text if len(ast.parse(text).body[0].body) else text + "\n    pass"


# --- config and weights -----------------------------------------------------------------------------

def hf_config(cfg: Config, lora: bool = False) -> llama_hf.MegatronLaxLlamaConfig:
    m = cfg.model
    fields = dict(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
                  num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads,
                  max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                  lowrank_format=m.method, rank=m.rank, attn_rank=m.attn_rank, mlp_rank=m.mlp_rank,
                  mlp_out_rank=m.mlp_out_rank, only_latent_act=m.only_latent_act, lax_gate=m.lax_gate,
                  lax_modules=list(m.lax_modules), lax_norm=m.lax_norm, lax_latent=m.lax_latent,
                  lax_gate_init=m.lax_gate_init)
    own = FORMATS[m.method].fields  # the format's own model.* fields (CoLA's only_latent_act, ...)
    if own is not None:
        fields.update({f.name: getattr(m, f.name) for f in dataclasses.fields(own)})
    if lora:
        fields.update(lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      lora_targets=list(cfg.lora.targets), lora_lax_gate=cfg.lora.lax_gate,
                      lora_lax_norm=cfg.lora.lax_norm, lora_lax_latent=cfg.lora.lax_latent)
    config = llama_hf.MegatronLaxLlamaConfig(**fields)
    config.architectures = ["MegatronLaxForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config


def hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under the transformers model's names: `model.` before all but the LM head."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in model.state_dict().items()}


def as_transformers(model: torch.nn.Module, cfg: Config, lora: bool = False) -> llama_hf.MegatronLaxForCausalLM:
    """The package's transformers model holding `model`'s weights (shared, not copied)."""
    config = hf_config(cfg, lora)
    with torch.device("meta"):
        hf = llama_hf.MegatronLaxForCausalLM(config)
    hf.load_state_dict(hf_weights(model), strict=True, assign=True)
    return hf.eval()


# --- the tokenizer ----------------------------------------------------------------------------------

def sentencepiece_file(spec: str) -> Path | None:
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        return path
    if path.is_dir() and (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
        return path / "tokenizer.model"
    return None


def write_tokenizer(spec: str, output: Path, max_length: int) -> bool:
    """The run's tokenizer where AutoTokenizer finds it: a SentencePiece model converted to a fast
    tokenizer that encodes as SentencePiece does (byte fallback kept), plus the .model itself; a
    local Hugging Face tokenizer saved again (its own files only; remote code never run). A
    symbolic link or a tokenizer that is not local is left out, with a note."""
    import sys
    model_file = sentencepiece_file(spec)
    if model_file is not None and not model_file.is_symlink():
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import SpmConverter
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        converter = type("Converter", (SpmConverter,), {"handle_byte_fallback": True})
        backend = converter(type("Spm", (), {"vocab_file": str(model_file)})).converted()
        special = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                            ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
                   if i >= 0}
        PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(output)
        settings = json.loads((output / "tokenizer_config.json").read_text())  # a class name 4.x knows too
        settings.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length)
        settings.pop("backend", None)
        (output / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
        shutil.copyfile(model_file, output / "tokenizer.model")
        return True
    path = Path(spec)
    if path.is_dir() and not path.is_symlink() and (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(path), trust_remote_code=False).save_pretrained(output)
        return True
    print(f"note: the tokenizer {spec} is not a local file or directory; the export has none", file=sys.stderr)
    return False


# --- the model card -----------------------------------------------------------------------------------

def model_card(cfg: Config, n_params: int, state: dict, lora: bool = False) -> str:
    """README.md with the Hub's front matter and what the model is: recipe, size, data seen, LaX."""
    from ..models import family_of
    m, vit = cfg.model, not family_of(cfg.model).uses_tokenizer
    val_loss, last = state.get("best_val_loss", math.inf), state.get("last_val") or {}
    if vit and "val_acc1" in last:
        metrics = [{"type": "accuracy", "name": "validation top-1 accuracy (%)", "value": round(last["val_acc1"], 4)}]
    elif not vit and math.isfinite(val_loss):
        metrics = [{"type": "perplexity", "name": "validation perplexity", "value": round(math.exp(val_loss), 4)}]
    else:
        metrics = []
    name = Path(cfg.logging.run_dir).name or "megatron-lax-model"
    task = ("image-classification", "image classification") if vit else ("text-generation", "language modelling")
    front = {"library_name": "transformers", "license": "apache-2.0", "pipeline_tag": task[0],
             "tags": ["megatron-lax", "lax", "low-rank", m.method, "custom_code"] + (["lora"] if lora else []),
             "model-index": [{"name": name, "results": [{
                 "task": {"type": task[0], "name": task[1]},
                 "dataset": {"type": "text", "name": Path(cfg.data.path).name or "validation"},
                 "metrics": metrics}] if metrics else []}]}
    import yaml
    seen = state.get("tokens", 0)  # the task's unit: tokens or images
    unit = "images" if vit else "tokens"
    lax = (f"LaX gate `{m.lax_gate}` (init {m.lax_gate_init}) on {', '.join(m.lax_modules)}; latent handed on: "
           f"`{m.lax_latent}`; LayerNorm on the crossing: {m.lax_norm}") if m.lax_gate != "none" else "no LaX"
    ranks = f"rank {m.rank}" + (f", attention {m.attn_rank}" if m.attn_rank else "") + (
        f", MLP {m.mlp_rank}" if m.mlp_rank else "")
    lines = [f"# {name}", "",
             f"A {'Vision Transformer' if vit else 'LLaMA-style language model'} trained with megatron-lax "
             f"({m.method}{', ' + ranks if FORMATS[m.method].lowrank else ''}; {lax}).", "",
             "| | |", "|---|---|",
             f"| parameters | {n_params:,} |",
             f"| shape | {m.n_layers} layers, width {m.dim}, {m.n_heads} heads, MLP {m.ffn_dim}, "
             + (f"{m.image_size}px images in {m.patch_size}px patches, {m.num_classes} classes |" if vit else
                f"{m.n_kv_heads or m.n_heads} key/value heads, vocabulary {m.vocab_size} |"),
             f"| training | {state.get('step', 0)} steps of {cfg.train.global_batch} {unit[:-1]} batches; "
             f"{seen:,} {unit} seen |",
             f"| optimiser | {cfg.optim.name if hasattr(cfg.optim, 'name') else 'adamw'}, learning rate "
             f"{cfg.optim.lr} |"]
    if metrics:
        lines.append(f"| {metrics[0]['name']} | {metrics[0]['value']} |")
    if lora:
        lines.append(f"| adapters | LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}, LaX gate "
                     f"{cfg.lora.lax_gate} |")
    lines += ["", "## Use", "", "```python", "from transformers import pipeline",
              "classify = pipeline('image-classification', model=DIR, trust_remote_code=True)", "```", ""] if vit else [
              "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
              "tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)", "```", "",
              "`modeling_megatron_lax.py` holds the whole model (torch and transformers only). Score it with "
              "lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True "
              "--tasks TASKS`.", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines)


# --- the folder -------------------------------------------------------------------------------------

def write_transformers(model: torch.nn.Module, cfg: Config, state: dict, output: Path, lora: bool = False,
                       max_shard_size: str = "5GB") -> None:
    """Writes the folder described in the module docstring into `output` (an empty staging directory)."""
    from transformers import GenerationConfig

    from ..models import count_parameters
    hf = as_transformers(model, cfg, lora)
    has_tokenizer = write_tokenizer(cfg.data.tokenizer, output, cfg.model.max_seq_len)
    if has_tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(output, trust_remote_code=False)
        hf.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                pad_token_id=tok.pad_token_id)
        hf.config.bos_token_id, hf.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        hf.config.pad_token_id = tok.pad_token_id
    hf.save_pretrained(output, max_shard_size=max_shard_size, safe_serialization=True)
    (output / MODELING_FILE).write_text(modeling_source(cfg.model.method))
    n_params = count_parameters(cfg.model) if not lora else sum(p.numel() for p in model.parameters())
    (output / "README.md").write_text(model_card(cfg, n_params, state, lora))
    if not lora:
        write_our_config(cfg, state, output)


def write_our_config(cfg: Config, state: dict, output: Path) -> None:
    """The run's config and step, so that evaluate and load_transformers_export read the folder as our
    model (as tensors; its modeling file is not run)."""
    (output / "config.yaml").write_text(dump_yaml(cfg))
    (output / EXPORT_MARKER).write_text(json.dumps({"format": "transformers", "step": state.get("step"),
                                                    "tokens": state.get("tokens")}))


VIT_MODELING_FILE = "modeling_megatron_lax_vit.py"
VIT_FIELDS = ("image_size", "patch_size", "in_channels", "num_classes", "dim", "n_layers", "n_heads", "ffn_dim",
              "dropout", "head_dropout", "mlp_norm", "method", "rank", "attn_rank", "mlp_rank", "mlp_out_rank",
              "lax_gate", "lax_modules", "lax_norm", "lax_latent", "lax_gate_init", "lax_intra_modules",
              "lax_intra_gate", "tt_attn_dims", "tt_fc1_dims", "tt_fc2_dims")


def class_names(cfg: Config) -> list[str]:
    """The run's class names where its data still names them, else LABEL_i."""
    from ..data.images import open_image_dataset
    try:
        names = list(open_image_dataset(cfg.data.path, cfg.data.eval_split).class_names)
    except Exception:  # the data may be gone or elsewhere; names are cosmetic
        names = []
    return names if len(names) == cfg.model.num_classes else [f"LABEL_{i}" for i in range(cfg.model.num_classes)]


def write_vit_transformers(model: torch.nn.Module, cfg: Config, state: dict, output: Path,
                           max_shard_size: str = "5GB") -> None:
    """A ViT as an AutoModelForImageClassification folder, with the image processor of our evaluation view."""
    from ..data.images import normalization
    from ..models import count_parameters
    from ..tasks.image_classification import augment_config
    config = vit_hf.MegatronLaxViTConfig(**{f: getattr(cfg.model, f) for f in VIT_FIELDS})
    labels = class_names(cfg)
    config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    config.architectures = ["MegatronLaxViTForImageClassification"]
    module = VIT_MODELING_FILE[:-3]
    config.auto_map = {"AutoConfig": f"{module}.MegatronLaxViTConfig",
                       "AutoModelForImageClassification": f"{module}.MegatronLaxViTForImageClassification"}
    with torch.device("meta"):
        hf = vit_hf.MegatronLaxViTForImageClassification(config)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    hf.save_pretrained(output, max_shard_size=max_shard_size, safe_serialization=True)
    view = augment_config(cfg, train=False)
    mean, std = normalization(view, cfg.model.in_channels)
    processor = {"image_processor_type": "MegatronLaxImageProcessor",
                 "auto_map": {"AutoImageProcessor": f"{module}.MegatronLaxImageProcessor"},
                 "image_size": cfg.model.image_size, "crop_pct": view.crop_pct, "image_mean": list(mean),
                 "image_std": list(std), "mode": "RGB" if cfg.model.in_channels == 3 else "L"}
    (output / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    (output / VIT_MODELING_FILE).write_text(modeling_source(cfg.model.method, vit_hf))
    (output / "README.md").write_text(model_card(cfg, count_parameters(cfg.model), state))
    write_our_config(cfg, state, output)


def write_export(model: torch.nn.Module, cfg: Config, state: dict, output: Path, max_shard_size: str = "5GB") -> str:
    """A pre-trained model of a family that names a module here (Family.transformers_export); returns
    what was written."""
    from ..models import family_of
    template = family_of(cfg.model).transformers_export
    if template == "llama":
        write_transformers(model, cfg, state, output, max_shard_size=max_shard_size)
        return "transformers (remote code)"
    write_vit_transformers(model, cfg, state, output, max_shard_size=max_shard_size)
    return "transformers image classifier (remote code)"
