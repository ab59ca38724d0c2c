"""Under DDP every rank computes the same S4 (DPLR) function, even when nobody set `l_max` and the
ranks' first batches have different lengths (each rank used to fix its own `l_max`)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssm


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = ssm.SequenceModel(4, vocab_size=16, d_model=16, n_layers=1, layer="s4", layer_config=dict(d_state=8))
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            L = [91, 85][rank] if step == 0 else 60
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(1, 16, (2, L), generator=g)
            out = ddp(ids)[0]
            out.sum().backward()
            opt.step()
            outs.append(out.detach())
    torch.save({"l_max": m.blocks[0].layer.l_max, "buffer": int(m.blocks[0].layer.ssm.fixed_l_max),
                "out": outs[1:]}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_agree_on_l_max_and_outputs(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["l_max"] == r1["l_max"] == r0["buffer"] == r1["buffer"] == 91
    for a, b in zip(r0["out"], r1["out"]):
        assert torch.equal(a, b)
