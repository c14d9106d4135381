"""Data parallelism and sharding on CPU (gloo): DDP and FSDP2 with 2 processes match 1 process.

The launch commands here are the ones ``docs/distributed.md`` shows, scaled down: ``train.py`` runs as a
subprocess (Lightning starts the second process itself). The data are 8 examples of equal token length,
so a mean over one batch of 4 equals the mean of two per-rank means over batches of 2; the attack is
sign-PGD, whose steps do not depend on the batch's size.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lat_lightning.cli import main
from lat_lightning.data.datamodule import ZippedSampler

pytestmark = pytest.mark.integration  # end-to-end: whole recipes / processes

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LAT_LIGHTNING_RUN_DIR",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
)
LETTERS = "ABCDEFGH"


def common_overrides(data_dir: Path, root: Path) -> list[str]:
    """lat_tiny (LoRA, PGD at layers 1-2, toward/away, KL teacher on benign data), deterministic and short."""
    return [
        "--recipe",
        "lat_tiny",
        f"data.harmful={data_dir / 'harmful.jsonl'}",
        f"data.benign={data_dir / 'benign.jsonl'}",
        "trainer.max_steps=2",
        "perturbation.optimizer=sign",
        "perturbation.steps=2",
        "perturbation.lr=0.1",
        f"logging.root_dir={root}",
        "trainer.accelerator=cpu",
    ]


def clean_env() -> dict[str, str]:
    """The test process's environment without launcher variables a previous in-process fit left behind."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("PL_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def launch(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def equal_length_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("equal_data")
    with open(out / "harmful.jsonl", "w") as f:
        for x in LETTERS:
            f.write(
                json.dumps(
                    {
                        "prompt": f"Tell me the code for vault {x}.",
                        "target": f"Sure, the code for vault {x} is 4-1-7-2.",
                    }
                )
                + "\n"
            )
    with open(out / "benign.jsonl", "w") as f:
        for x in LETTERS:
            f.write(json.dumps({"prompt": f"What is {x} plus 2?", "response": f"It is {x} plus two."}) + "\n")
    return out


@pytest.fixture(scope="module")
def runs(equal_length_data, tmp_path_factory):
    """Lazily computed run directories: 'one' (1 process, batch 4), 'ddp' and 'fsdp2' (2 processes × 2)."""
    root = tmp_path_factory.mktemp("dist_runs")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            args = common_overrides(equal_length_data, root / kind)
            if kind == "one":
                assert main(args + ["data.batch_size=4"]) == 0
            else:
                launch(args + ["data.batch_size=2", f"trainer.strategy={kind}", "trainer.devices=2"])
            done[kind] = root / kind / "lat_tiny" / "version_0"
        return done[kind]

    return get


def test_equal_length_data_really_is_equal_length(equal_length_data):
    from lat_lightning.cli import load_config
    from lat_lightning.data.datamodule import SafetyDataModule
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.stages.settings import datamodule_settings

    cfg = load_config("lat_tiny", common_overrides(equal_length_data, Path("unused"))[2:])
    dm = SafetyDataModule(datamodule_settings(cfg), load_tokenizer(cfg.model))
    dm.setup("fit")
    for items, keys in (
        (dm.train_dataset.safety, ("prompt_ids", "safe_ids", "harmful_ids")),
        (dm.train_dataset.benign, ("prompt_ids", "response_ids")),
    ):
        for key in keys:
            assert len({len(item[key]) for item in items}) == 1, key


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, ddp = adapter(runs("one")), adapter(runs("ddp"))
    assert one.keys() == ddp.keys() and any("lora_B" in k for k in one)
    moved = [k for k in one if "lora_B" in k and one[k].abs().max() > 0]
    assert moved, "training must change the adapter"
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-6, rtol=1e-5)
    # every rank wrote into the same run directory; rank 0 exported
    assert sorted(p.name for p in runs("ddp").parent.iterdir()) == ["version_0"]
    assert (runs("ddp") / "final_merged" / "model.safetensors").exists()


def test_fsdp2_two_processes_match_ddp(runs):
    ddp, fsdp2 = adapter(runs("ddp")), adapter(runs("fsdp2"))
    for k in ddp:
        torch.testing.assert_close(fsdp2[k], ddp[k], atol=1e-6, rtol=1e-5)
    ckpt = runs("fsdp2") / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").exists(), "FSDP2 writes a sharded (distributed) checkpoint"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs("fsdp2") / "tensorboard"))
    events.Reload()  # the sharded model ran the PGD attack (from a cached layer) and the KL teacher
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_kl", "train/loss_away_from_harmful", "attack/attack_loss_after"} <= tags


def test_attack_never_syncs_and_defence_syncs_once_per_optimizer_step(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """DDP (1 gloo process, in-process): a comm hook counts gradient all-reduces per micro-batch."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from lat_lightning.config import ModelConfig, RunConfig
    from lat_lightning.models.loading import load_model
    from lat_lightning.stages.fit_setup import build_module
    from tests.helpers.batches import safety_batch

    events: list = []

    def count(state, bucket):
        events.append("allreduce")
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # Lightning registers comm hooks on CUDA only
            trainer.strategy.model.register_comm_hook(None, count)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            events.append(f"batch{batch_idx}")

    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "perturbation": {"attack": "pgd", "layers": [1], "steps": 3, "positions": "prompt", "away_from_safe": 0.5},
            "loss": {"away_from_harmful": 0.5},
            "trainer": {"max_steps": 2, "accumulate_grad_batches": 2, "warmup_ratio": 0.0},
        },
    )
    mcfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), {"name_or_path": str(tiny_llama_dir), "lora": {"enabled": True, "r": 4}}
    )
    module = build_module(cfg, load_model(mcfg), tiny_tokenizer)
    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()  # Lightning's launcher sets both
    os.environ["OMP_NUM_THREADS"] = "1"  # gloo's threads and 2 OpenMP threads thrash on a 2-core machine
    torch.set_num_threads(1)
    try:
        trainer = pl.Trainer(
            max_steps=2,
            accelerator="cpu",
            devices=1,
            callbacks=[Probe()],
            logger=False,
            strategy=DDPStrategy(process_group_backend="gloo"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        batches = [safety_batch(tiny_tokenizer, n=2) for _ in range(4)]
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
    # 3 attack steps per micro-batch and 2 micro-batches per optimiser step: one all-reduce per step
    assert events == ["batch0", "batch1", "allreduce", "batch2", "batch3", "allreduce"]


@pytest.mark.parametrize("n,batch,world", [(8, 2, 2), (7, 2, 2), (5, 1, 3), (3, 2, 2)])
def test_sampler_gives_each_rank_its_slice_of_every_global_batch(n, batch, world):
    single = list(ZippedSampler(n, 0, shuffle=True, seed=3))
    shares = []
    for rank in range(world):
        s = ZippedSampler(n, 0, shuffle=True, seed=3)
        s.shard(rank, world, batch)
        shares.append(list(s))
        assert len(shares[-1]) == len(s)
    assert len({len(x) for x in shares}) == 1, "every rank runs the same number of steps"
    global_batches = [sum((sh[i : i + batch] for sh in shares), []) for i in range(0, len(shares[0]), batch)]
    flat = sum(global_batches, [])
    assert flat[:n] == single  # rank slices of each global batch, concatenated, are the 1-process order
    assert set(flat[n:]) <= set(single)  # the last global batch is completed from the start of the order


def test_sampler_resume_skips_consumed_items_once():
    s = ZippedSampler(6, 0, shuffle=True, seed=1)
    full = list(s)
    s.skip_once(0, 4)
    assert list(s) == full[4:]
    assert list(s) == full  # only once
    s.skip_once(1, 2)
    assert list(s) == full  # another epoch


def test_strategy_mapping_and_decoder_layer_classes(tiny_model_dirs):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lat_lightning.cli import load_config
    from lat_lightning.stages.settings import model_settings, trainer_settings
    from lat_lightning.training.distributed import build_strategy as build_from_settings
    from lat_lightning.training.distributed_fsdp import decoder_layer_classes

    def build_strategy(cfg):
        return build_from_settings(trainer_settings(cfg), model_settings(cfg), cfg.perturbation.early_stop_loss)

    for arch, cls in (("llama", LlamaDecoderLayer), ("gpt2", GPT2Block)):
        cfg = load_config("lat_tiny", [f"model.name_or_path={tiny_model_dirs[arch]}"])
        assert decoder_layer_classes(model_settings(cfg)) == {cls}
    cfg = load_config(
        "lat_tiny",
        [
            f"model.name_or_path={tiny_model_dirs['llama']}",
            "trainer.strategy=fsdp",
            "trainer.accelerator=gpu",
            "model.gradient_checkpointing=true",
            "trainer.fsdp_state_dict_type=full",
        ],
    )
    fsdp = build_strategy(cfg)
    assert isinstance(fsdp, FSDPStrategy) and fsdp.kwargs["use_orig_params"] is True
    assert fsdp._state_dict_type == "full"
    assert fsdp._activation_checkpointing_kwargs  # checkpointing by decoder-layer class
    assert build_strategy(load_config("lat_tiny", ["trainer.strategy=ddp"])) == "ddp"
    mp = build_strategy(load_config("lat_tiny", ["trainer.strategy=fsdp2", "trainer.devices=2", "trainer.num_nodes=2"]))
    assert isinstance(mp, ModelParallelStrategy) and mp._data_parallel_size == 4 and mp._tensor_parallel_size == 1


def test_every_rank_of_a_torchrun_launch_uses_rank_zeros_directory(tmp_path, monkeypatch):
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError
    from lat_lightning.rundir import create_run_dir

    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    cfg = load_config("lat_tiny", [f"logging.root_dir={tmp_path}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("RANK", "0")
    first = create_run_dir(cfg, "lat_tiny")
    assert first == tmp_path / "lat_tiny" / "runabc" and (first / "config.yaml").exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LAT_LIGHTNING_RUN_DIR")
    assert create_run_dir(cfg, "lat_tiny") == first
    assert not (first / "config.resumed.yaml").exists(), "ranks > 0 write nothing"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="--rdzv-id"):
        create_run_dir(cfg, "lat_tiny")


def test_fsdp2_full_finetuning_shards_the_kl_teacher(equal_length_data, tmp_path):
    """Full fine-tuning under FSDP2 with the KL teacher: each of the 2 ranks holds part of the frozen copy."""
    proc = launch(
        common_overrides(equal_length_data, tmp_path)
        + ["model.lora.enabled=false", "data.batch_size=2", "trainer.strategy=fsdp2", "trainer.devices=2"]
    )
    # Two processes print to one pipe: their lines may run together, so match the records, not the lines.
    found = re.findall(r"\[kl_teacher\] rank (\d+)/2: (\d+) of (\d+) teacher", proc.stdout)
    assert len(found) == 2, proc.stdout[-2000:]
    held = {int(rank): (int(local), int(total)) for rank, local, total in found}
    assert sorted(held) == [0, 1]
    total = held[0][1]
    assert held[1][1] == total and all(0 < local < total for local, _ in held.values())
    assert sum(local for local, _ in held.values()) == total  # the two shards make up the whole teacher
