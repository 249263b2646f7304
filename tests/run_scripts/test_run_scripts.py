"""The launch paths users type: the DeepSpeed launcher and bash on the run scripts, and a two-node
torchrun rendezvous on this machine."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, as_cli, free_port, losses, run_command

SHRINK = {**TINY, "train.token_budget": "0", "train.steps": 3, "logging.log_every": 1, "checkpoint.every": 0,
          "train.eval_every": 0}


def launcher_env(**extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable, **extra}


def test_deepspeed_launcher_runs_the_1b_script_shrunk(prepared_sample, tmp_path):
    env = launcher_env(DATA=str(prepared_sample), TOKENIZER="tokenizer/sample", RUN_DIR=str(tmp_path / "run"))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    result = run_command([deepspeed, "--master_port", str(free_port()), "run_scripts/pretrain_1b.sh",
                          *as_cli(SHRINK)], env=env)
    assert "cola + LaX (identity)" in result.stdout + result.stderr  # the script's default variant
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    from megatron_lax.config import load_config
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))  # the 1B CoLA + LaX recipe, shrunk by our overrides
    assert (cfg.parallel.engine, cfg.optim.lr, cfg.optim.grad_clip, cfg.train.global_batch) == ("deepspeed", 1e-2, 0.5, 8)


def test_bash_script_launches_torchrun_and_user_arguments_win(prepared_sample, tmp_path):
    env = launcher_env(ENGINE="ddp", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), METHOD="svd", GATE="linear",
                       DATA=str(prepared_sample), TOKENIZER="tokenizer/sample", RUN_DIR=str(tmp_path / "run"))
    run_command(["bash", "run_scripts/pretrain_60m.sh", *as_cli(SHRINK), "--optim.lr", "0.005"], env=env)
    from megatron_lax.config import load_config
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert (cfg.parallel.engine, cfg.model.method, cfg.model.lax_gate) == ("ddp", "svd", "linear")
    assert cfg.optim.lr == 0.005 and cfg.optim.grad_clip == 0.5 and cfg.data.mode == "paper"


TABLE_14 = {  # scale: steps, warmup, LR of (SVD, SVD + LaX, CoLA, CoLA + LaX)
    "60m": (10_000, 2_000, (2e-3, 2e-2, 6e-3, 4e-2)), "130m": (20_000, 4_000, (1e-3, 1e-2, 4e-3, 2e-2)),
    "350m": (60_000, 12_000, (1e-3, 1e-2, 3e-3, 2e-2)), "1b": (100_000, 20_000, (8e-4, 3e-3, 2e-3, 1e-2)),
}


@pytest.mark.parametrize("scale", TABLE_14)
def test_each_script_resolves_to_table_14(scale):
    """The config each script trains with, as resolved (token budget -> steps): Table 14 exactly."""
    import yaml
    steps, warmup, lrs = TABLE_14[scale]
    variants = [("svd", "none"), ("svd", "identity"), ("cola", "none"), ("cola", "identity")]
    for (method, gate), lr in zip(variants, lrs):
        result = run_command([sys.executable, f"run_scripts/pretrain_{scale}.sh", "--print-config"],
                             env={"METHOD": method, "GATE": gate})
        cfg = yaml.safe_load(result.stdout)
        assert (cfg["train"]["steps"], cfg["optim"]["warmup_steps"], cfg["optim"]["lr"]) == (steps, warmup, lr)
        assert (cfg["train"]["token_budget"], cfg["train"]["global_batch"], cfg["data"]["seq_len"]) == ("paper", 512, 256)
        assert (cfg["optim"]["weight_decay"], cfg["optim"]["grad_clip"], cfg["optim"]["min_lr_ratio"]) == (0.01, 0.5, 0.1)
        assert cfg["data"]["mode"] == "paper" and (cfg["model"]["method"], cfg["model"]["lax_gate"]) == (method, gate)
        assert cfg["model"]["lowrank_init"] == "cola"
        assert cfg["train"]["precision"] == "bf16-pure"  # pinned, as GaLore/CoLA train (PRECISION overrides)
        # CoLA's MLP as CoLA's config for the scale: 350M and 1B drop the SwiGLU's own SiLU (only_lr_act)
        assert cfg["model"]["only_latent_act"] == (method == "cola" and scale in ("350m", "1b"))
        assert cfg["data"]["tokenizer"] == "hf:t5-base"  # the tokenizer C4 is prepared with (TOKENIZER overrides)


def test_two_nodes_rendezvous_on_localhost(prepared_sample, tmp_path):
    port = free_port()
    args = ["-m", "megatron_lax.train", "--config", "llama_tiny",
            *as_cli({**SHRINK, "data.path": prepared_sample, "logging.run_dir": tmp_path / "run",
                     "parallel.engine": "fsdp"})]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_id", "two-nodes",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", *args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 rank(s)" in "".join(outputs)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


@pytest.mark.parametrize("scale", ["60m", "130m", "350m", "1b"])
def test_each_script_is_bash_and_python_for_its_scale(scale):
    """Every script, run by bash, hands itself and the user's arguments to the launcher (here
    ENGINE=single with `echo` as the Python, so nothing starts); read as Python, it compiles and
    trains at its own scale. The full bash -> launcher -> Python path runs above for 60m (torchrun)
    and 1b (DeepSpeed)."""
    script = f"run_scripts/pretrain_{scale}.sh"
    result = run_command(["bash", script, "--optim.lr", "0.1"], env=launcher_env(ENGINE="single", PYTHON="echo"))
    assert result.stdout.split() == [script, "--optim.lr", "0.1"]
    source = (REPO / script).read_text()
    compile(source, script, "exec")
    assert f'main("{scale}")' in source


def launch_script(tmp_path, timeout: int = 60, **env) -> subprocess.CompletedProcess:
    """`bash run_scripts/pretrain_60m.sh` with a `deepspeed` on PATH that only records being called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "deepspeed").write_text(f"#!/usr/bin/env bash\ntouch {tmp_path / 'launcher-started'}\n")
    (bin_dir / "deepspeed").chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run(["bash", "run_scripts/pretrain_60m.sh", "--train.steps", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **launcher_env(**env), "PATH": path})


def test_hostfile_naming_a_node_that_does_not_resolve_stops_before_the_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nlocalhost slots=1\nno-such-node.invalid slots=8\n")
    result = launch_script(tmp_path, HOSTFILE=str(hostfile))
    assert result.returncode == 2 and not (tmp_path / "launcher-started").exists()
    assert result.stderr.strip() == f"error: hostfile {hostfile} names node 'no-such-node.invalid', which does not resolve"
    hostfile.write_text("localhost slots=1\n")
    assert launch_script(tmp_path, HOSTFILE=str(hostfile)).returncode == 0
    assert (tmp_path / "launcher-started").exists()


def test_master_addr_that_does_not_resolve_stops_before_torchrun(tmp_path):
    result = launch_script(tmp_path, ENGINE="fsdp", NNODES="2", MASTER_ADDR="no-such-node.invalid")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: MASTER_ADDR names node 'no-such-node.invalid', which does not resolve"


def test_rendezvous_that_never_completes_ends_in_one_line_within_its_timeout(tmp_path):
    """The second of two nodes never starts: torchrun gives up after RDZV_TIMEOUT (3 s here) and the
    launcher says why in one line, instead of waiting (torchrun's default: 600 s) or a traceback."""
    port = free_port()
    start = time.time()
    result = launch_script(tmp_path, ENGINE="fsdp", NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), RDZV_TIMEOUT="3", RUN_DIR=str(tmp_path / "run"))
    assert result.returncode == 2 and time.time() - start < 30
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the c10d rendezvous at 127.0.0.1:{port} did not complete (RendezvousTimeoutError): a node did "
        f"not start within RDZV_TIMEOUT, or the endpoint does not answer")
    assert not (tmp_path / "run").exists()  # no worker started, nothing written


TABLE_9 = {  # script: (preset, LR full rank, LR low rank, TT ranks (attention, fc1, fc2), TT fc2 modes)
    "vit_b": ("vit_b", 3e-3, 1e-3, (336, 158, 159), [48, 64, 32, 24]),
    "vit_l": ("vit_l", 3e-3, 1e-3, (256, 198, 198), [64, 64, 32, 32]),
}
RECIPES = {  # what each named recipe sets where the paper is silent (megatron_lax/launch.py VIT_RECIPES)
    "official": {"train": {"global_batch": 1024, "micro_batch": 128, "precision": "fp32", "tf32": True},
                 "optim": {"grad_clip": 0.0},
                 "augment": {"auto_augment": "original", "randaugment_n": 0, "mixup": 0.2, "cutmix": 0.0,
                             "random_erasing": 0.0, "label_smoothing": 0.1},
                 "model": {"head_dropout": 0.0, "lowrank_init": "kaiming"}},
    "deit": {"train": {"global_batch": 4096, "micro_batch": 128, "precision": "bf16-mixed", "tf32": False},
             "optim": {"grad_clip": 1.0},
             "augment": {"auto_augment": "none", "randaugment_n": 2, "randaugment_m": 9, "mixup": 0.8, "cutmix": 1.0,
                         "random_erasing": 0.25, "label_smoothing": 0.1},
             "model": {"head_dropout": None, "lowrank_init": "auto", "dropout": 0.1, "lax_gate_init": "identity"}},
}


@pytest.mark.parametrize("scale", TABLE_9)
def test_each_vit_script_resolves_to_table_9(scale, capsys):
    """The config each ViT script trains with: Tables 9-10 (and 11-12 for where LaX goes) and the named
    recipe's settings. The default recipe through the script itself, every variant of both recipes
    through the recipe function it runs (in this process)."""
    import yaml
    from megatron_lax.launch import vit_recipe
    from megatron_lax.train import main
    preset, dense_lr, lowrank_lr, tt_ranks, fc2_modes = TABLE_9[scale]
    script = yaml.safe_load(run_command([sys.executable, f"run_scripts/pretrain_{scale}.sh", "--print-config"],
                                        env={"METHOD": "tt", "GATE": "tensor"}).stdout)
    deit_script = yaml.safe_load(run_command([sys.executable, f"run_scripts/pretrain_{scale}.sh", "--print-config"],
                                             env={"METHOD": "svd", "RECIPE": "deit"}).stdout)
    for recipe, expected in RECIPES.items():
        for method, gate in [("dense", "none"), ("svd", "none"), ("svd", "tensor"), ("cola", "tensor"),
                             ("tt", "none"), ("tt", "tensor")]:
            args = vit_recipe(scale, method, gate, "deepspeed", "1", "data/imagenet", "runs/x", recipe=recipe)
            assert main(args + ["--print-config"]) == 0
            cfg = yaml.safe_load(capsys.readouterr().out)
            m, o, t = cfg["model"], cfg["optim"], cfg["train"]
            for section, values in expected.items():
                assert {k: cfg[section][k] for k in values} == values, (recipe, section)
            official_dense = recipe == "official" and method == "dense"
            assert (m["arch"], m["method"], m["lax_gate"], m["dropout"]) == ("vit", method, gate,
                                                                            0.0 if official_dense else 0.1)
            assert cfg["augment"]["crop_pct"] == (0.9 if official_dense else 0.875)
            if recipe == "official":
                assert m["lax_gate_init"] == ("kaiming" if gate == "tensor" else "identity")
            assert (m["image_size"], m["patch_size"]) == (224, 16)
            assert o["lr"] == (dense_lr if method == "dense" else lowrank_lr)
            assert (o["weight_decay"], o["warmup_epochs"], o["min_lr_ratio"], t["epochs"]) == (0.3, 10, 0.0, 300)
            assert (o["beta1"], o["beta2"]) == (0.9, 0.999)
            if method in ("svd", "cola"):
                assert m["rank"] == 256
            if method == "tt":
                assert (m["attn_rank"], m["mlp_rank"], m["mlp_out_rank"]) == tt_ranks
                assert [int(d) for d in m["tt_fc2_dims"]] == fc2_modes
                assert m["lax_intra_modules"] == (["q", "k", "v", "o"] if gate != "none" else [])
            assert m["lax_modules"] == ["all"]
            assert cfg["checkpoint"]["every"] == cfg["train"]["eval_every"] == 1_281_167 // t["global_batch"]
            if (recipe, method, gate) == ("official", "tt", "tensor"):  # RUN_DIR's default names the variant
                assert script == {**cfg, "logging": {**cfg["logging"], "run_dir": f"runs/{scale}_tt_tensor"}}
            if (recipe, method, gate) == ("deit", "svd", "tensor"):
                assert deit_script == {**cfg, "logging": {**cfg["logging"], "run_dir": f"runs/{scale}_svd_tensor"}}
    source = (REPO / f"run_scripts/pretrain_{scale}.sh").read_text()
    compile(source, scale, "exec")
    assert f'main("{scale}")' in source


def test_finetune_templates_script_refuses_a_base_of_another_length(tmp_path):
    """A rerun whose OUT already holds a base trained for other steps stops before training anything,
    rather than mixing that base into the study's runs."""
    base = tmp_path / "out" / "bases" / "base2"
    base.mkdir(parents=True)
    (base / "finished.json").write_text('{"steps": 1000}')
    result = subprocess.run(["bash", "run_scripts/reproduce_finetune_templates.sh"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, **launcher_env(OUT=str(tmp_path / "out"))}, timeout=60)
    assert result.returncode != 0
    assert "the base was trained 1000 steps, not BASE_STEPS=3000" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "bases").iterdir()) == ["base2"]  # nothing else began
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bases"]


def test_a_remote_deepspeed_rank_builds_the_recipe_of_the_launching_node(tmp_path):
    """pdsh starts remote ranks without METHOD, GATE, ...: what the launcher is handed must carry them."""
    from megatron_lax.launch import RANK_ENVIRONMENT, RECIPE_ENVIRONMENT, recipe_arguments
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "deepspeed").write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {tmp_path / 'argv'}\n")
    (bin_dir / "deepspeed").chmod(0o755)
    local = {"METHOD": "svd", "GATE": "dense", "ZERO_STAGE": "2", "DATA": str(tmp_path / "my data"),
             "PRECISION": "bf16-mixed", "RUN_DIR": str(tmp_path / "run")}
    env = {**os.environ, **launcher_env(**local), "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    subprocess.run(["bash", "run_scripts/pretrain_1b.sh", "--optim.lr", "0.1"], cwd=REPO, env=env, check=True,
                   timeout=60)
    script, *handed = (tmp_path / "argv").read_text().splitlines()
    assert script == "run_scripts/pretrain_1b.sh"
    remote_environment = {k: v for k, v in os.environ.items() if k not in RECIPE_ENVIRONMENT}
    on_remote_rank = recipe_arguments("1b", handed + ["--local_rank=3"], remote_environment)
    assert on_remote_rank == recipe_arguments("1b", ["--optim.lr", "0.1"], local)
    assert on_remote_rank != recipe_arguments("1b", ["--optim.lr", "0.1"], {})  # the defaults differ
    launch_source = (REPO / "megatron_lax" / "launch.py").read_text()
    read = set(re.findall(r'environ\.get\("([A-Z_]+)"', launch_source))
    assert read <= set(RECIPE_ENVIRONMENT) | set(RANK_ENVIRONMENT) and set(RECIPE_ENVIRONMENT) <= set(
        re.findall(r"\b([A-Z_]+)\b", (REPO / "run_scripts" / "launch.sh").read_text()))


def tiny_template_task(where: Path) -> dict:
    """The template task's files, a few problems each, and a little narrative pre-training text."""
    from data_prep.make_arithmetic import narrative_documents, template_split, write_c4_shard, write_json
    split = template_split(24, 6, list(range(2, 13)), 0, ("add", "take_away", "compare", "multiply"), 6, 0.3)
    for name in ("train", "test_templates", "select_templates"):
        write_json(where / f"{name}.json", split[name])
    (where / "raw").mkdir()
    for side, n in (("train", 60), ("validation", 10)):
        write_c4_shard(where / "raw" / f"arith-{side}.00000-of-00001.json.gz", narrative_documents(n, side, 12, 6))
    return {"base": f"--data.raw {where / 'raw'} --data.path {where / 'prepared'} --model.dim 32 --model.n_heads 2 "
                    f"--model.n_layers 2 --model.ffn_dim 64 --train.global_batch 4 --train.micro_batch 4 "
                    f"--train.eval_tokens 512 --logging.log_every 1",
            "finetune": f"finetune.train_json={where / 'train.json'} finetune.test_json={where / 'test_templates.json'} "
                        f"finetune.val_size=4 finetune.max_new_tokens=12 train.global_batch=4 train.micro_batch=4"}


def test_finetune_templates_script_leaves_a_live_base_and_its_log_alone(tmp_path):
    """A second launch of the study while a base is still training (its run.lock held, here by this
    process) stops at that base with the run's one-line refusal, and the live run's log keeps its lines."""
    import subprocess

    from megatron_lax.training.checkpoint import lock_run_dir, release_run_dir
    task = tiny_template_task(tmp_path)
    out = tmp_path / "out"
    live = out / "bases" / "base1"
    lock_run_dir(live)
    (out / "bases" / "base1.log").write_text("step 7 of the live run\n")
    env = launcher_env(OUT=str(out), BASE_STEPS="3", BASES="1", SEEDS="1", SELECT_SEEDS="100", RATES="1e-2",
                       CELLS="lora_r1", STEPS="2", SELECT=str(tmp_path / "select_templates.json"),
                       BASE_ARGS=task["base"], FT_SET=task["finetune"])
    try:
        result = subprocess.run(["bash", "run_scripts/reproduce_finetune_templates.sh"], cwd=REPO, text=True,
                                capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    finally:
        release_run_dir(live)
    assert result.returncode != 0 and "base 1 failed" in result.stderr and not (out / "tune").exists()
    log = (out / "bases" / "base1.log").read_text()
    assert log.startswith("step 7 of the live run\n") and "is in use by a live run" in log


def test_finetune_templates_script_runs_the_study_over_bases_end_to_end(tmp_path, capsys):
    """The whole study, shrunk: a selection base and two reported bases (seeds 0; 1, 2) of 3 steps, each
    cell's rate chosen on base 0 by the selection wording, two cells x two seeds on each reported base,
    the pooled table. The bases differ (the base seed sets the initialisation), the tuning runs saw only
    the selection file and base 0, and every reported run used its own base."""
    import json

    from megatron_lax.experiments.finetune_study import main, weight_differences
    task = tiny_template_task(tmp_path)
    out = tmp_path / "out"
    env = launcher_env(OUT=str(out), BASE_STEPS="3", BASES="1 2", SEEDS="1 2", SELECT_SEEDS="100", RATES="1e-2",
                       CELLS="lora_r1 lax_identity_nonorm_r1", STEPS="2", SELECT=str(tmp_path / "select_templates.json"),
                       BASE_ARGS=task["base"], FT_SET=task["finetune"])
    result = run_command(["bash", "run_scripts/reproduce_finetune_templates.sh"], env=env, timeout=300)
    table = (out / "table.md").read_text()
    assert "Bases: base1, base2." in table and "| lax_identity_nonorm_r1 − lora_r1 | 2 x 2/2 |" in table
    assert "| lax_identity_nonorm_r1 − lora_r1 | base2 | 2 |" in table
    bases = [out / "bases" / f"base{b}" for b in (0, 1, 2)]
    assert all(weight_differences(a, b)["differing"] for a, b in [bases[:2], bases[1:], bases[::2]])
    assert main(["same-weights", str(bases[1]), str(bases[1])]) == 0 and main(["same-weights", *map(str, bases[1:])]) == 1
    fine_tune = next((out / "cells").rglob("finished.json")).parent  # scored, its checkpoints removed
    assert main(["same-weights", str(bases[1]), str(fine_tune)]) == 2
    assert f"error: no intact checkpoint found at {fine_tune}" in capsys.readouterr().err
    tuned = [json.loads(p.read_text()) for p in (out / "tune").rglob("result.json")]
    assert len(tuned) == 2 and all(r["overrides"]["finetune.base"].endswith("bases/base0") for r in tuned)
    assert all([f["file"] for f in r["files"]] == [str(tmp_path / "select_templates.json")] for r in tuned)
    for path in (out / "cells").rglob("result.json"):
        r = json.loads(path.read_text())
        assert r["overrides"]["finetune.base"].endswith(f"bases/{path.parts[-4]}") and r["lr"] == 1e-2
        assert [f["file"] for f in r["files"]] == [str(tmp_path / "test_templates.json")]
    assert len(list((out / "cells").rglob("result.json"))) == 8 and "chosen 0.01" in result.stdout
