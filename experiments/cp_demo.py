"""Context parallelism demo: one long sequence (default 1,048,576 tokens) through a small S4D model,
forward + backward, split over N gloo processes on the CPU, next to the same model in one process.

Prints for each process the wall time of forward + backward and its peak resident memory (peak
RSS; it includes what every process pays for importing torch and for a 64-token warm-up call that
imports the kernels, both reported apart),
then the largest difference between the split run and the single run in the outputs and in the
parameter gradients (relative to the largest value). The math: docs/distributed.md.

Examples:
  python -m experiments.cp_demo                           # 4 ranks, then the single process
  python -m experiments.cp_demo --length 65536 --nproc 2 --json cp.json
  torchrun --nproc_per_node 4 -m experiments.cp_demo --worker   # ranks started by torchrun (no single run)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssm
from ssm.distributed import context_parallel, reduce_gradients, shard_sequence

D_IO = 4                                   # input features and outputs per token


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.cp_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=1 << 20, help="tokens in the one sequence (default 1048576)")
    p.add_argument("--d-model", type=int, default=16, help="model width H (default 16)")
    p.add_argument("--d-state", type=int, default=16, help="S4D state size N (default 16)")
    p.add_argument("--n-layers", type=int, default=2, help="S4D blocks (default 2)")
    p.add_argument("--nproc", type=int, default=4, help="context-parallel processes (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 shows the split run equals the single run to float64 rounding")
    p.add_argument("--skip-single", action="store_true", help="do not run the single-process comparison")
    p.add_argument("--worker", action="store_true", help="run as one rank of a group started by torchrun")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for name in ("length", "d_model", "d_state", "n_layers", "nproc", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _model(args) -> ssm.SequenceModel:
    torch.manual_seed(0)
    return ssm.SequenceModel(D_IO, d_input=D_IO, d_model=args.d_model, n_layers=args.n_layers, layer="s4d",
                             layer_config=dict(d_state=args.d_state), pooling="none")


def run_rank(args, rank: int, world: int, out_dir: str | None) -> dict:
    """Forward + backward of this rank's part (the whole sequence when world == 1)."""
    torch.set_num_threads(args.threads)
    baseline = _rss_mib()
    dtype = getattr(torch, args.dtype)
    model = _model(args).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.length, D_IO, generator=g, dtype=dtype)    # (1, L, 4)
    w = torch.randn(1, args.length, D_IO, generator=g, dtype=dtype)
    if world > 1:
        context_parallel(model)
        x, w = shard_sequence(x), shard_sequence(w)
    warm = x[:, : max(1, 64 // world)]                                 # first calls import kernels lazily
    model(warm)[0].sum().backward()
    model.zero_grad(set_to_none=True)
    warm_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    y, _ = model(x)                                                    # (1, L_r, 4)
    (y * w).sum().backward()
    elapsed = time.perf_counter() - start
    if world > 1:
        reduce_gradients(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = dict(rank=rank, world=world, tokens=x.shape[1], time_s=elapsed, peak_rss_mib=peak,
                  import_rss_mib=baseline, warm_rss_mib=warm_rss)
    if out_dir is not None:
        grads = {n: p.grad for n, p in model.named_parameters()} if rank == 0 else None
        torch.save(dict(result=result, y=y.detach(), grads=grads), os.path.join(out_dir, f"w{world}r{rank}.pt"))
    return result


def _rank_main(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run_rank(args, rank, world, out_dir)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(out_dir: str, world: int) -> dict:
    """Largest |split - single| over the outputs and the parameter gradients, relative to the largest value."""
    ranks = [torch.load(os.path.join(out_dir, f"w{world}r{r}.pt")) for r in range(world)]
    single = torch.load(os.path.join(out_dir, "w1r0.pt"))
    y = torch.cat([r["y"] for r in ranks], dim=1)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    grads = max(rel(ranks[0]["grads"][n], g) for n, g in single["grads"].items())
    return dict(output_rel_diff=rel(y, single["y"]), grad_rel_diff=grads)


def _print(rows: list[dict]) -> None:
    print(f"{'run':>8} {'rank':>4} {'tokens':>9} {'fwd+bwd s':>10} {'peak RSS MiB':>13} {'after import':>13} "
          f"{'after warm-up':>14}")
    for r in rows:
        run = "single" if r["world"] == 1 else f"cp x{r['world']}"
        print(f"{run:>8} {r['rank']:>4} {r['tokens']:>9} {r['time_s']:>10.1f} {r['peak_rss_mib']:>13.0f} "
              f"{r['import_rss_mib']:>13.0f} {r['warm_rss_mib']:>14.0f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:                                     # torchrun: RANK, WORLD_SIZE, MASTER_* in the environment
        dist.init_process_group("gloo")
        result = run_rank(args, dist.get_rank(), dist.get_world_size(), None)
        dist.destroy_process_group()
        print(json.dumps(result))
        return dict(rows=[result])
    from experiments.bench.timing import git_commit
    out_dir = tempfile.mkdtemp(prefix="cp_demo_")
    report = dict(commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  torch=torch.__version__, cores=os.cpu_count(), args=vars(args))
    mp.start_processes(_rank_main, args=(args.nproc, _free_port(), args, out_dir), nprocs=args.nproc,
                       join=True, start_method="spawn")
    if not args.skip_single:
        mp.start_processes(_rank_main, args=(1, _free_port(), args, out_dir), nprocs=1, join=True,
                           start_method="spawn")
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".pt"))
    rows = [torch.load(os.path.join(out_dir, f))["result"] for f in files]
    rows.sort(key=lambda r: (r["world"] == 1, r["rank"]))
    report["rows"] = rows
    if not args.skip_single:
        report.update(_compare(out_dir, args.nproc))
    print(f"commit {report['commit']}, {report['date']}, torch {report['torch']}, {report['cores']} cores; "
          f"S4D d_model={args.d_model} d_state={args.d_state} n_layers={args.n_layers}, L={args.length}, "
          f"{args.dtype}, {args.threads} thread(s) per process")
    _print(rows)
    if not args.skip_single:
        print(f"max relative difference, split vs single: outputs {report['output_rel_diff']:.2e}, "
              f"parameter gradients {report['grad_rel_diff']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
