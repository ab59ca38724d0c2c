"""How one synthetic-task run is built on the LRA trainer's pieces: the per-position model, the
streamed splits, the collate, and the `experiments.lra.trainer.Trainer` that the LRA loop,
evaluation and checkpoints then drive unchanged.

The model is `ssm.SequenceModel` with pooling "none" (logits at every position) and causal blocks;
targets of -100 mark positions without a label, which the LRA loss and accuracy ignore.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.lra.models import make_optimizer
from experiments.lra.schedules import lr_multiplier
from experiments.lra.trainer import ResumableSampler, Runtime, ShardSampler, Trainer, train_collate
from experiments.synthetic.config import Config, eval_factors, layer_config
from experiments.synthetic.data import SyntheticDataset


class TokenModel(nn.Module):
    """`forward(ids (B, L), lengths=None) -> logits (B, L, n_classes)`: a causal SequenceModel."""

    def __init__(self, cfg: Config, device=None):
        super().__init__()
        from ssm.models import SequenceModel

        t = cfg.task_config
        self.backbone = SequenceModel(t.n_classes, vocab_size=t.vocab_size, d_model=cfg.model.d_model,
                                      n_layers=cfg.model.n_layers, layer=cfg.model_name,
                                      layer_config=layer_config(cfg), pooling="none", device=device)
        if cfg.model_name == "s4":
            # A DPLR layer's learned C belongs to one length: the training length.
            self.backbone.set_l_max(t.seq_len)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, *,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        # Every synthetic sequence fills its row: `lengths` (all L) is not passed on. Packed rows
        # (`experiments.lra.packing`) pass `seq_idx`.
        out, _ = self.backbone(x, seq_idx=seq_idx)                     # (B, L, n_classes)
        return out

    def default_state(self, batch_size: int, device=None):
        return self.backbone.default_state(batch_size, device=device)


def collate(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (L,), targets (L,)) items -> ids (B, L), lengths (B,) (all L), targets (B, L)."""
    x = torch.stack([ids for ids, _ in batch])                         # (B, L)
    y = torch.stack([t for _, t in batch])                             # (B, L)
    return x, torch.full((x.shape[0],), x.shape[1], dtype=torch.long), y


def splits(cfg: Config) -> dict:
    d, seed = cfg.data, cfg.train.seed
    return {name: SyntheticDataset(cfg.task_config, n, seed=seed, split=name)
            for name, n in (("train", d.n_train), ("val", d.n_val), ("test", d.n_test))}


def build(cfg: Config, rt: Runtime, out: Path) -> Trainer:
    """Model, optimizer, schedule and loader, in the order that fixes the random streams."""
    torch.manual_seed(cfg.train.seed)
    model = TokenModel(cfg, device=rt.device)
    optimizer = make_optimizer(model, cfg)
    data = splits(cfg)
    if len(data["train"]) < cfg.data.batch_size:
        raise ValueError(f"--data.n_train={cfg.data.n_train} is fewer than one batch "
                         f"(--data.batch_size={cfg.data.batch_size})")
    sampler = ResumableSampler(data["train"], num_replicas=1, rank=0, seed=cfg.train.seed)
    loader = DataLoader(data["train"], batch_size=cfg.data.batch_size, sampler=sampler,
                        collate_fn=train_collate(cfg, collate, cfg.task_config.seq_len),
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.train.seed))
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.data.batch_size)
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, cfg.optim,
                                                                               total_steps=total))
    task = SimpleNamespace(n_classes=cfg.task_config.n_classes, two_tower=False)
    return Trainer(cfg, rt, task, out, data, model, model, optimizer, scheduler, sampler, loader,
                   steps_per_epoch, total, collate=collate, tag="synthetic")


def length_results(tr: Trainer) -> dict[str, dict]:
    """Test accuracy at each `data.eval_lengths` multiple of the training length (current weights)."""
    from experiments.lra.evaluate import evaluate

    cfg = tr.cfg
    out = {}
    for f in eval_factors(cfg):
        task_cfg = dataclasses.replace(cfg.task_config, seq_len=cfg.task_config.seq_len * f)
        ds = SyntheticDataset(task_cfg, cfg.data.n_test, seed=cfg.train.seed, split="test")
        # Longer rows cost more memory: shrink the batch so a batch holds about as many tokens.
        bs = max(1, (cfg.data.eval_batch_size or cfg.data.batch_size) // f)
        loader = DataLoader(ds, batch_size=bs, sampler=ShardSampler(len(ds), num_replicas=1, rank=0),
                            collate_fn=collate)
        res = evaluate(tr.model, loader, device=tr.rt.device, amp=tr.rt.amp, n_classes=tr.task.n_classes, world=1)
        out[str(f)] = {"seq_len": task_cfg.seq_len, "acc": res["acc"], "loss": res["loss"], "n": res["n"]}
    return out
