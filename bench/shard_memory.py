"""Peak memory per rank: a model that is mostly weights, trained with Adam by fit on 2
CPU ranks (gloo), under DistributedDataParallel and sharded (setup_distributed(shard=True)).

    python bench/shard_memory.py [--layers 12] [--width 2048] [--ranks 2]

The model: ``layers`` Linear(width, width) layers with ReLU between, batch 16 of random
rows, 2 epochs of 4 steps. Each rank reports its peak resident memory (ru_maxrss) less
what it held before the model was built (torch imported, the group joined), and the
bytes of its own parameters, gradients and Adam moments (a DTensor's local shard).
Under DDP every rank holds all of them (and DDP's gradient buckets); sharded, each
holds 1/ranks of them plus the weights of the layer it is running, gathered for it
(setup_distributed fixes glibc's mmap threshold on CPU: without it the freed gathers
stay in the heap and the sharded peak grew past DDP's, 1.6 GB against 1.2 GB).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def worker(mode, layers, width, out):
    import torch
    sys.path.insert(0, ROOT)
    import loops
    torch.distributed.init_process_group("gloo")
    before = rss_mb()
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(layers)
                                for m in (torch.nn.Linear(width, width), torch.nn.ReLU())])
    model, _ = loops.setup_distributed(net, shard=mode == "shard")
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    X = torch.randn(16 * 4 * 2, width)
    loops.fit(model, (X, X.clone()), torch.nn.MSELoss(), opt, epochs=2, batch_size=16,
              verbose=0)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    state = sum(local(t).numel() * 4 for p in model.parameters()
                for t in [p, p.grad, *opt.state[p].values()]
                if t is not None and t.dim())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"{mode}{rank}.json"), "w") as f:
        json.dump({"peak": peak - before, "state": state / 2**20}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker", nargs=2)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], a.layers, a.width, a.worker[1])
    params = a.layers * (a.width * a.width + a.width)
    print(f"{a.layers} x Linear({a.width}, {a.width}): {params / 1e6:.1f} M parameters, "
          f"{params * 4 / 2**20:.0f} MB of weights; {a.ranks} ranks, gloo, Adam")
    with tempfile.TemporaryDirectory() as out:
        for mode in ("ddp", "shard"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={a.ranks}", os.path.abspath(__file__),
                            "--layers", str(a.layers), "--width", str(a.width),
                            "--worker", mode, out], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [json.load(open(os.path.join(out, f"{mode}{r}.json")))
                    for r in range(a.ranks)]
            print(f"{mode:>5}: peak added per rank "
                  + ", ".join(f"{r['peak']:.0f} MB" for r in rows)
                  + "; weights, gradients and Adam moments held per rank "
                  + ", ".join(f"{r['state']:.0f} MB" for r in rows))


if __name__ == "__main__":
    main()
