"""What the checksum costs a checkpoint: save_checkpoint and load_checkpoint of a model
with Adam's state, with and without the checkpoint guards' CRC-32 (a copy of loops.py
without that one line), timed in one process, alternated, best of ``--rounds``.

    python bench/checksum.py [--params 25_000_000] [--rounds 5]
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import loops  # noqa: E402


def unsealed():
    """loops.py as a module whose save writes no checksum (and whose load has none to check)."""
    with open(os.path.join(ROOT, "loops.py")) as f:
        source = f.read()
    line = '    _maybe("_seal", ckpt)  # its checksum, verified as it is read (checkpoint guards)\n'
    assert source.count(line) == 1
    path = os.path.join(tempfile.mkdtemp(), "loops_unsealed.py")
    with open(path, "w") as f:
        f.write(source.replace(line, ""))
    spec = importlib.util.spec_from_file_location("loops_unsealed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=25_000_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    side = int((args.params / 4) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(side, side) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, side)).sum().backward()
    opt.step()  # Adam's moments: the file holds three times the weights
    d = tempfile.mkdtemp()
    times = {}
    for _ in range(args.rounds):
        for name, module in (("sealed", loops), ("plain", unsealed())):
            path = os.path.join(d, name + ".pt")
            t0 = time.perf_counter()
            module.save_checkpoint(path, model, opt, epoch=1)
            t1 = time.perf_counter()
            module.load_checkpoint(path, model, opt)
            t2 = time.perf_counter()
            best = times.setdefault(name, [float("inf"), float("inf")])
            best[0], best[1] = min(best[0], t1 - t0), min(best[1], t2 - t1)
    size = os.path.getsize(os.path.join(d, "sealed.pt")) / 1e6
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters with Adam, "
          f"{size:.0f} MB a file, best of {args.rounds}, one thread:")
    for i, what in enumerate(("save", "load")):
        s, pl = times["sealed"][i], times["plain"][i]
        print(f"  {what}: {pl:.2f} s without the checksum, {s:.2f} s with it "
              f"(+{s - pl:.2f} s, {s / pl:.2f}x; CRC-32 at {size / max(s - pl, 1e-9):.0f} MB/s)")


if __name__ == "__main__":
    main()
