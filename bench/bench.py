"""Speed and memory benchmark: loops.fit against the hand-written tutorial loop.

    python bench/bench.py [--quick] [--device cuda] [--rounds N] [--only pima] [--out F]
    python bench/bench.py --instructions     (needs valgrind: counts instead of timing)
    python bench/bench.py --memory           (peak memory: fit against the hand loop)

For each workload it times, interleaved (A B C A B C ...) after a warm-up and
on one thread, the training call of:
  hand        the tutorial loop: per step slice a randperm batch, forward, loss,
              zero_grad, backward, step, keep loss.item(); per epoch an eval-mode
              no-grad pass over the test set computing its loss and metric
  dataloader  the same loop fed by DataLoader(TensorDataset(X, y), shuffle=True)
  fit         loops.fit with the metric on, verbose=1 into a non-terminal
  fit_silent  loops.fit with the metric on, verbose=0
and prints the median over rounds of each one's time divided by the hand loop's
time in the same round. Peers (pytorch-ignite, Lightning, skorch, poutyne,
Keras 3 on torch; bench/peers.py) join as extra columns when they are
importable; they are never requirements. It then checks that time per epoch
grows linearly with the data, that memory stays flat over 100 epochs, times
plots_ascii and the imports, and (on CUDA) counts host-device synchronisations
per epoch. Mixed precision (bf16 autocast) and gradient accumulation are each
timed against the same technique written into the hand loop (accumulation: a hand
loop that sums the same training values fit reports, the bare loop beside it); on CUDA, fit in
bf16 is also timed against fit in fp32.

--memory measures the peak memory a training call adds (its peak resident set
minus the resident set before it: Linux's VmHWM, reset by /proc/self/clear_refs),
each run in a process of its own: the hand loop (shuffled, .item() per step, a
validation pass an epoch) and fit without and with a metric, validation and a
checkpoint directory, on 60,000 rows x 200 features (48 MB), an MLP
200-1024-1024-10, batch 256, 10,000 validation rows, 2 epochs, one thread; then
at 2x and 4x the rows. On CUDA, torch.cuda.max_memory_allocated too.

--instructions counts instead of timing: CPU instructions per epoch under
valgrind's cachegrind (a 3-epoch run minus a 1-epoch run, halved), one thread,
a fixed hash seed. fit's time-based looks (progress refresh, NaN look) then
read SteadyClock, a stand-in clock that advances 1 ms per reading, so they come
at the same steps however slow valgrind or a busy machine makes the run: the
count does not move with load.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import loops  # noqa: E402
import peers  # noqa: E402  (bench/peers.py)


# --- workloads --------------------------------------------------------------------

def mlp(sizes, last=None):
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.pop()
    if last is not None:
        layers.append(last)
    return torch.nn.Sequential(*layers)


def hits(out, y):
    """Correct predictions (binary probabilities or class scores), as a tensor."""
    if out.shape[-1] == 1:
        return ((out > 0.5) == (y > 0.5)).sum()
    return (out.argmax(1) == y).sum()


def abs_err(out, y):
    return (out - y).abs().sum()


def workloads(quick):
    """name -> dict(data maker, model maker, loss, metric, batch size, epochs)."""
    g = torch.Generator().manual_seed(0)

    def tabular(n, d, kind):
        X = torch.randn(n, d, generator=g)
        w = torch.randn(d, 1, generator=g)
        if kind == "binary":
            y = ((X @ w + 0.5 * torch.randn(n, 1, generator=g)) > 0.4).float()
        else:
            y = X @ w + 0.3 * torch.randn(n, 1, generator=g)
        return X, y

    def images(n):
        y = torch.randint(0, 10, (n,), generator=g)
        centers = torch.rand(10, 784, generator=g)
        return (centers[y] + 0.5 * torch.rand(n, 784, generator=g)).clamp(0, 1), y

    return {
        "pima-like 768x8, MLP 8-12-8-1, batch 10": dict(
            data=lambda: (tabular(768, 8, "binary"), tabular(192, 8, "binary")),
            model=lambda: mlp([8, 12, 8, 1], torch.nn.Sigmoid()), loss=torch.nn.BCELoss(),
            metric=("acc", "binary_accuracy", hits), batch=10, epochs=1 if quick else 50),
        "housing-like 20640x8, MLP 8-24-12-6-1, batch 32": dict(
            data=lambda: (tabular(20640, 8, "reg"), tabular(4128, 8, "reg")),
            model=lambda: mlp([8, 24, 12, 6, 1]), loss=torch.nn.MSELoss(),
            metric=("mae", "mae", abs_err), batch=32, epochs=1 if quick else 5),
        "mnist-like 12000x784, MLP 784-250-100-10, batch 64": dict(
            data=lambda: (images(12000), images(2000)),
            model=lambda: mlp([784, 250, 100, 10]), loss=torch.nn.CrossEntropyLoss(),
            metric=("acc", "accuracy", hits), batch=64, epochs=1 if quick else 2),
    }


# --- contenders: each trains a fresh model and returns the seconds of its training call ---

# The two tutorial loops are written out in full on purpose, as people write them:
# the reference must not pay for a shared helper (a generator per step would slow
# the baseline and flatter fit).
def hand_loop(w, model, opt, train, test, device):
    X, y = train
    Xt, yt = test
    loss_fn, (_, _, metric), b = w["loss"], w["metric"], w["batch"]
    t0 = time.perf_counter()
    for _ in range(w["epochs"]):
        model.train()
        perm = torch.randperm(len(X), device=device)
        losses = []
        for i in range(0, len(X), b):
            idx = perm[i:i + b]
            xb, yb = X[idx], y[idx]
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            out = model(Xt)
            test_loss, test_metric = loss_fn(out, yt).item(), metric(out, yt).item() / len(Xt)
    sync(device)
    return time.perf_counter() - t0


def dataloader_loop(w, model, opt, train, test, device):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train),
                                         batch_size=w["batch"], shuffle=True)
    Xt, yt = test
    loss_fn, (_, _, metric) = w["loss"], w["metric"]
    t0 = time.perf_counter()
    for _ in range(w["epochs"]):
        model.train()
        losses = []
        for xb, yb in loader:
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            out = model(Xt)
            test_loss, test_metric = loss_fn(out, yt).item(), metric(out, yt).item() / len(Xt)
    sync(device)
    return time.perf_counter() - t0


def hand_autocast_loop(w, model, opt, train, test, device):
    """The tutorial loop with mixed precision as PyTorch's AMP recipe writes it (bf16,
    so no GradScaler): forward and loss under torch.autocast, the rest unchanged."""
    X, y = train
    Xt, yt = test
    loss_fn, (_, _, metric), b = w["loss"], w["metric"], w["batch"]
    t0 = time.perf_counter()
    for _ in range(w["epochs"]):
        model.train()
        perm = torch.randperm(len(X), device=device)
        losses = []
        for i in range(0, len(X), b):
            idx = perm[i:i + b]
            xb, yb = X[idx], y[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(xb)
                loss = loss_fn(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(Xt)
            test_loss, test_metric = loss_fn(out, yt).item(), metric(out, yt).item() / len(Xt)
    sync(device)
    return time.perf_counter() - t0


ACCUMULATE = 4


def hand_accumulate_loop(w, model, opt, train, test, device):
    """The tutorial loop with gradient accumulation written out: one optimizer step per
    ACCUMULATE batches, each batch's loss weighted by its share of the group's rows."""
    X, y = train
    Xt, yt = test
    loss_fn, (_, _, metric), b, k = w["loss"], w["metric"], w["batch"], ACCUMULATE
    t0 = time.perf_counter()
    for _ in range(w["epochs"]):
        model.train()
        perm = torch.randperm(len(X), device=device)
        losses = []
        for g in range(0, len(X), b * k):
            rows = min(b * k, len(X) - g)
            opt.zero_grad()
            for i in range(g, g + rows, b):
                idx = perm[i:i + b]
                xb, yb = X[idx], y[idx]
                loss = loss_fn(model(xb), yb)
                (loss * (len(idx) / rows)).backward()
                losses.append(loss.item())
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(Xt)
            test_loss, test_metric = loss_fn(out, yt).item(), metric(out, yt).item() / len(Xt)
    sync(device)
    return time.perf_counter() - t0


def hand_accumulate_sums_loop(w, model, opt, train, test, device):
    """The accumulating loop computing the training values fit reports: the epoch's loss
    and metric summed over its rows on the device and read once an epoch (no .item() per
    batch), as fit does: what accumulate=k's fit is compared with."""
    X, y = train
    Xt, yt = test
    loss_fn, (_, _, metric), b, k = w["loss"], w["metric"], w["batch"], ACCUMULATE
    t0 = time.perf_counter()
    for _ in range(w["epochs"]):
        model.train()
        perm = torch.randperm(len(X), device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        metric_sum = torch.zeros((), dtype=torch.float64, device=device)
        for g in range(0, len(X), b * k):
            rows = min(b * k, len(X) - g)
            opt.zero_grad()
            for i in range(g, g + rows, b):
                idx = perm[i:i + b]
                xb, yb = X[idx], y[idx]
                out = model(xb)
                loss = loss_fn(out, yb)
                (loss * (len(idx) / rows)).backward()
                loss_sum += loss.detach() * len(idx)
                metric_sum += metric(out.detach(), yb)
            opt.step()
        train_loss, train_metric = loss_sum.item() / len(X), metric_sum.item() / len(X)
        model.eval()
        with torch.no_grad():
            out = model(Xt)
            test_loss, test_metric = loss_fn(out, yt).item(), metric(out, yt).item() / len(Xt)
    sync(device)
    return time.perf_counter() - t0


def fit_call(verbose, **options):
    def run(w, model, opt, train, test, device):
        name, builtin, _ = w["metric"]
        sink = io.StringIO()  # a non-terminal: summary lines only, as in a log
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            loops.fit(model, train, w["loss"], opt, epochs=w["epochs"], val=test,
                      batch_size=w["batch"], metrics={name: builtin}, verbose=verbose,
                      device=device, **options)
        sync(device)
        return time.perf_counter() - t0
    return run


CORE = {"hand": hand_loop, "dataloader": dataloader_loop, "fit": fit_call(1),
        "fit_silent": fit_call(0)}
# Each technique against the same technique written by hand: "hand" is the unit.
TECHNIQUES = {
    "bf16 autocast": {"hand": hand_autocast_loop, "fit": fit_call(1, precision="bf16")},
    f"accumulate {ACCUMULATE}": {"hand": hand_accumulate_sums_loop,
                                 "hand_bare": hand_accumulate_loop,
                                 "fit": fit_call(1, accumulate=ACCUMULATE)},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the measurement -----------------------------------------------------------------

def compare(w, contenders, rounds, device):
    (train, test) = w["data"]()
    train = tuple(t.to(device) for t in train)
    test = tuple(t.to(device) for t in test)
    times = {name: [] for name in contenders}

    def once(fn, workload=w):
        gc.collect()  # every call starts from the same heap, not the last one's garbage
        torch.manual_seed(0)
        model = workload["model"]().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return fn(workload, model, opt, train, test, device)

    for fn in contenders.values():  # warm-up: allocator, kernels, lazy imports
        once(fn, dict(w, epochs=1))
    for r in range(rounds):
        names = list(contenders)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in names:
            times[name].append(once(contenders[name]))
    ratios, spread = {}, {}
    for name in contenders:
        r = sorted(t / h for t, h in zip(times[name], times["hand"]))
        ratios[name] = statistics.median(r)
        spread[name] = (r[len(r) // 4], r[(3 * len(r)) // 4])  # the middle half of the rounds
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return ratios, spread, seconds


def overhead(device, quick):
    """The loop's own cost, in microseconds: fit minus the hand loop on a model so small
    that the difference is all bookkeeping (per step: one long epoch; per epoch: many
    one-step epochs with a validation pass each). Medians over interleaved repeats."""
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(8000, 8, generator=g).to(device), torch.randn(8000, 1, generator=g)
    y = y.to(device)
    w = dict(loss=torch.nn.MSELoss(), metric=("mae", "mae", abs_err), model=lambda: mlp([8, 1]))
    # (workload, train, test, what to divide by, repeats): a step costs ~0.1 ms, so
    # its case can afford more repeats, which its small difference needs.
    many, rows = (100, 2000) if quick else (1000, 8000)  # one-step epochs; rows of the long one
    cases = {"per step": (dict(w, batch=10, epochs=1), (X[:rows], y[:rows]), (X[:200], y[:200]),
                          rows // 10, 41),
             "per epoch": (dict(w, batch=10, epochs=many), (X[:10], y[:10]), (X[:200], y[:200]),
                           many, 15)}
    out = {}
    for name, (wl, train, test, count, repeats) in cases.items():
        diffs = []
        for r in range(2 if quick else repeats):
            times = {}
            for who, fn in (("hand", hand_loop), ("fit", fit_call(0))):
                gc.collect()
                torch.manual_seed(0)
                model = wl["model"]().to(device)
                times[who] = fn(wl, model, torch.optim.SGD(model.parameters(), 0.01), train,
                                test, device)
            diffs.append((times["fit"] - times["hand"]) / count * 1e6)
        out[name] = statistics.median(diffs)
    return out


def scaling(device, quick):
    """fit's seconds per epoch on the housing workload at 1x, 4x and 16x the rows (--quick:
    1x and 2x an eighth of them, 2,580 rows: a smoke run)."""
    w = workloads(quick)["housing-like 20640x8, MLP 8-24-12-6-1, batch 32"]
    g = torch.Generator().manual_seed(1)
    out = {}
    model = w["model"]().to(device)  # warm-up, so that 1x does not pay for first calls
    loops.fit(model, (torch.randn(64, 8), torch.randn(64, 1)), w["loss"],
              torch.optim.Adam(model.parameters()), epochs=1, verbose=0, device=device)
    rows = 20640 // 8 if quick else 20640
    for k in (1, 2) if quick else (1, 4, 16):
        X = torch.randn(rows * k, 8, generator=g).to(device)
        y = torch.randn(rows * k, 1, generator=g).to(device)
        model = w["model"]().to(device)
        t0 = time.perf_counter()
        loops.fit(model, (X, y), w["loss"], torch.optim.Adam(model.parameters()), epochs=1,
                  batch_size=32, metrics={"mae": "mae"}, verbose=0, device=device)
        sync(device)
        out[k] = time.perf_counter() - t0
    return out


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(device, quick):
    """RSS (and CUDA memory) after epoch 2 and after the last of 100 pima epochs."""
    w = workloads(quick)["pima-like 768x8, MLP 8-12-8-1, batch 10"]
    (train, test) = w["data"]()
    model = w["model"]().to(device)
    seen = {}

    def record(epoch, logs):
        seen[epoch] = (rss_mb(), torch.cuda.memory_allocated() / 2**20
                       if device.type == "cuda" else 0.0)
    epochs = 10 if quick else 100
    loops.fit(model, train, w["loss"], torch.optim.Adam(model.parameters()), epochs=epochs,
              val=test, batch_size=10, metrics={"acc": "binary_accuracy"}, verbose=0,
              device=device, on_epoch_end=record)
    return {"epochs": epochs, "rss_epoch_2_mb": seen[2][0], "rss_last_mb": seen[epochs][0],
            "cuda_epoch_2_mb": seen[2][1], "cuda_last_mb": seen[epochs][1]}


MEMORY_RUNS = {  # name -> fit's options (None: the hand loop)
    "hand": None, "fit": {}, "fit + accuracy": {"metrics": {"acc": "accuracy"}},
    "fit + validation": {"val": True},
    "fit + accuracy + validation + checkpoint": {"metrics": {"acc": "accuracy"}, "val": True,
                                                  "checkpoint": True}}


def peak_memory(run, scale, quick, device):
    """The peak memory one training call adds, in MB: this process's peak resident set
    during the call minus its resident set before (and on CUDA the peak allocated)."""
    import tempfile
    torch.set_num_threads(1)
    n, width = (int(6000 * scale), 256) if quick else (int(60000 * scale), 1024)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 200, generator=g), torch.randint(0, 10, (n,), generator=g)
    Xv, yv = torch.randn(10000, 200, generator=g), torch.randint(0, 10, (10000,), generator=g)
    X, y, Xv, yv = (t.to(device) for t in (X, y, Xv, yv))
    torch.manual_seed(0)
    model = mlp([200, width, width, 10]).to(device)
    opt, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), torch.nn.CrossEntropyLoss()

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith(key))
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM, the peak, starts again from now
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    options = MEMORY_RUNS[run]
    if options is None:
        for _ in range(2):  # the tutorial's loop: shuffled batches, .item() each step
            model.train()
            order = torch.randperm(n).to(device)
            for i in range(0, n, 256):
                xb, yb = X[order[i:i + 256]], y[order[i:i + 256]]
                loss = loss_fn(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss.item()
            model.eval()
            with torch.no_grad():
                hits = sum((model(Xv[i:i + 256]).argmax(1) == yv[i:i + 256]).sum().item()
                           for i in range(0, len(Xv), 256))
    else:
        with tempfile.TemporaryDirectory() as d:
            loops.fit(model, (X, y), loss_fn, opt, epochs=2, batch_size=256, verbose=0,
                      metrics=options.get("metrics"), val=(Xv, yv) if options.get("val") else None,
                      checkpoint=os.path.join(d, "run") if options.get("checkpoint") else None)
    out = {"peak_mb": status("VmHWM") - before}
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    print(json.dumps(out))


def memory_table(device, quick, rounds):
    """Each run of MEMORY_RUNS in a process of its own, ``rounds`` times (the median: glibc's
    heap differs from one process to the next by a few MB), at 1x (and 2x, 4x) the rows."""
    def measure(run, scale):
        results = []
        for _ in range(rounds):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-one", run,
                                str(scale), "--device", str(device)] + ["--quick"] * quick,
                               capture_output=True, text=True, check=True)
            results.append(json.loads(p.stdout.splitlines()[-1]))
        return {k: statistics.median(r[k] for r in results) for k in results[0]}
    rows = {run: measure(run, 1) for run in MEMORY_RUNS}
    hand = rows["hand"]["peak_mb"]
    width = max(map(len, MEMORY_RUNS))
    print(f"peak memory a training call adds (median of {rounds} processes each; "
          f"{'quick' if quick else '60,000 x 200 rows, MLP 200-1024-1024-10, batch 256'}):")
    for run, r in rows.items():
        print(f"  {run:<{width}} {r['peak_mb']:7.1f} MB  {r['peak_mb'] / hand:5.2f}x the hand loop"
              + (f"; CUDA {r['cuda_peak_mb']:.1f} MB" if "cuda_peak_mb" in r else ""))
    scales = {}
    for run in ("hand", "fit + accuracy + validation + checkpoint"):
        scales[run] = {str(k): rows[run]["peak_mb"] if k == 1 else measure(run, k)["peak_mb"]
                       for k in (1, 2, 4)}
        print(f"  {run} at 1x, 2x, 4x the rows: "
              + ", ".join(f"{v:.1f}" for v in scales[run].values()) + " MB")
    return {"runs": rows, "scaling": scales}


def plot_speed():
    import plots_ascii
    values = [((i * 7919) % 1000) / 1000 for i in range(10000)]
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        plots_ascii.line_plot({"loss": values}, width=72, height=18)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def import_ms(module, after="", runs=5):
    code = (f"import time{', ' + after if after else ''}\n"
            f"t = time.perf_counter(); import {module}; print(time.perf_counter() - t)")
    times = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout) for _ in range(runs)]
    return statistics.median(times) * 1000


def cuda_syncs(device):
    """Host-device synchronisations per epoch of fit (verbose=0), counted by torch."""
    import warnings
    w = workloads(True)["housing-like 20640x8, MLP 8-24-12-6-1, batch 32"]
    (train, test) = w["data"]()
    train = tuple(t.to(device) for t in train)
    counts = {}
    for precision in (None, "bf16"):
        for verbose in (0, 2):
            model = w["model"]().to(device)
            opt = torch.optim.Adam(model.parameters())
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught, \
                        contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("always")
                    loops.fit(model, train, w["loss"], opt, epochs=2, batch_size=32,
                              metrics={"mae": "mae"}, verbose=verbose, device=device,
                              precision=precision)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            counts[f"verbose={verbose}" + (f", {precision}" if precision else "")] = \
                len(caught) / 2
    counts["steps_per_epoch"] = -(-len(train[0]) // 32)
    return counts


# What --instructions counts, by name: each technique's fit beside the same technique
# written into the hand loop.
COUNTED = {"hand": hand_loop, "fit": CORE["fit"], "fit_silent": CORE["fit_silent"],
           "hand_bf16": hand_autocast_loop, "fit_bf16": TECHNIQUES["bf16 autocast"]["fit"],
           "hand_accumulate": hand_accumulate_sums_loop,
           "hand_accumulate_bare": hand_accumulate_loop,
           "fit_accumulate": TECHNIQUES[f"accumulate {ACCUMULATE}"]["fit"]}


class SteadyClock:
    """A stand-in for the time module inside loops while instructions are counted: each
    reading is 1 ms after the one before. fit's time-based looks (a refresh ten times a
    second, a NaN look once a second) then come at the same steps on every machine and
    under any load, as on a fast idle machine, instead of whenever the slowed-down
    run (valgrind runs it ~50x slower) crosses a second."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1e-3
        return self.now


def run_one(workload, who, epochs):
    """One contender for ``epochs`` epochs of one workload, untimed: what --instructions counts."""
    w = dict(workloads(False)[workload], epochs=epochs)
    (train, test) = w["data"]()
    torch.manual_seed(0)
    model = w["model"]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loops.time = SteadyClock()  # fit's looks at a fixed cadence: see SteadyClock
    COUNTED[who](w, model, opt, train, test, torch.device("cpu"))


def instructions(names):
    """CPU instructions of one training epoch (validation included), counted by valgrind's
    cachegrind: the count of a 3-epoch run minus that of a 1-epoch run, halved, so start-up
    and data making cancel. Unlike time, the count does not move with the neighbours.
    The two small-model workloads only: there bookkeeping weighs most, while mnist's
    large matrix products run a hundred times slower under valgrind."""
    import re
    from concurrent.futures import ThreadPoolExecutor
    small = [wname for wname in workloads(False) if not wname.startswith("mnist")]
    # No idle BLAS or OpenMP worker threads (their spinning would be counted too) and
    # one string hash seed (dict and set probing would move the count by millions).
    quiet_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                      OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")

    def count(job):
        wname, who, epochs = job
        p = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                            "--cachegrind-out-file=/dev/null", sys.executable,
                            os.path.abspath(__file__), "--one", wname, who, str(epochs)],
                           capture_output=True, text=True, check=True, env=quiet_env)
        return int(re.search(r"I\s+refs:\s+([\d,]+)", p.stderr).group(1).replace(",", ""))
    jobs = [(wname, who, e) for wname in small for who in names for e in (1, 3)]
    # Ratios: fit to the hand loop, each technique's fit to its own hand loop.
    unit = {who: "hand_" + who.split("_", 1)[1] if "_" in who and who != "fit_silent"
            else "hand" for who in names}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(count, jobs)))
    out = {}
    for wname in small:
        per_epoch = {who: (counts[wname, who, 3] - counts[wname, who, 1]) / 2 for who in names}
        out[wname] = {"per_epoch": per_epoch,
                      "ratios": {who: per_epoch[who] / per_epoch[unit[who]] for who in names}}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs and rounds (< 1 minute)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--only", default="", metavar="TEXT",
                   help="time only the workloads whose name holds TEXT (e.g. pima)")
    p.add_argument("--out", default=None, help="where the JSON goes (default: bench/"
                   "results.json, or bench/instructions.json with --instructions)")
    p.add_argument("--instructions", action="store_true",
                   help="count CPU instructions per epoch under valgrind instead of timing")
    p.add_argument("--counted", default=",".join(COUNTED), metavar="NAMES",
                   help="with --instructions: the contenders to count (default: all of "
                        f"{','.join(COUNTED)})")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of fit against the hand loop, each in its own process")
    p.add_argument("--one", nargs=3, metavar=("WORKLOAD", "WHO", "EPOCHS"), help=argparse.SUPPRESS)
    p.add_argument("--memory-one", nargs=2, metavar=("RUN", "SCALE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    if args.one:
        return run_one(args.one[0], args.one[1], int(args.one[2]))
    if args.memory_one:
        return peak_memory(args.memory_one[0], float(args.memory_one[1]), args.quick, device)
    if args.memory:
        args.out = args.out or os.path.join(ROOT, "bench", "memory.json")
        rounds = args.rounds or (1 if args.quick else 3)
        results = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "rounds": rounds,
                   **memory_table(device, args.quick, rounds)}
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        return
    args.out = args.out or os.path.join(
        ROOT, "bench", "instructions.json" if args.instructions else "results.json")
    if args.instructions:
        names = args.counted.split(",")
        if not set(names) <= set(COUNTED) or "hand" not in names:
            p.error(f"--counted takes 'hand' and names among {', '.join(COUNTED)}")
        counted = instructions(names)
        print("CPU instructions per epoch (valgrind cachegrind), ratio to the hand-written loop "
              "with the same technique")
        for wname, r in counted.items():
            e = r["per_epoch"]
            bare = (f"(fit_accumulate against the bare accumulating loop: "
                    f"{e['fit_accumulate'] / e['hand_accumulate_bare']:.3f})  "
                    if {"fit_accumulate", "hand_accumulate_bare"} <= set(e) else "")
            print(f"{wname:<52}" + "".join(f"{who} {v:.3f}  " for who, v in r["ratios"].items()
                                           if not who.startswith("hand"))
                  + bare + f"(hand {e['hand'] / 1e6:.0f}M)")
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "instructions": counted}, f, indent=2)
        return
    rounds = args.rounds or (3 if args.quick else 21)
    contenders = {**CORE, **peers.available()}

    env = (f"torch {torch.__version__}, Python {platform.python_version()}, "
           f"{platform.machine()}, {os.cpu_count()} cores, 1 thread, device {device}"
           + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"loops benchmark, {time.strftime('%Y-%m-%d')}: {env}")
    print(f"median of {rounds} interleaved rounds; time ratio to the hand-written loop "
          "(lower is better)\n")
    results = {"date": time.strftime("%Y-%m-%d"), "environment": env, "rounds": rounds,
               "quick": args.quick, "workloads": {}}
    names = list(contenders)
    header = f"{'workload':<56}" + "".join(f"{n:>12}" for n in names) + f"{'hand s':>9}"
    print(header)
    print("-" * len(header))
    chosen = {k: w for k, w in workloads(args.quick).items() if args.only in k}
    if not chosen:
        p.error(f"--only {args.only!r} names no workload; they are: "
                + ", ".join(workloads(args.quick)))
    for wname, w in chosen.items():
        ratios, spread, seconds = compare(w, contenders, rounds, device)
        results["workloads"][wname] = {"epochs": w["epochs"], "ratios": ratios,
                                       "middle_half": spread, "seconds": seconds}
        label = f"{wname}, {w['epochs']} ep"
        print(f"{label:<56}"
              + "".join(f"{ratios[n]:>12.3f}" for n in names) + f"{seconds['hand']:>9.2f}")
        print(f"{'  middle half of the rounds':<56}"
              + "".join(f"{f'{spread[n][0]:.2f}-{spread[n][1]:.2f}':>12}" for n in names))

    print(f"\nthe same technique written by hand is the unit ({rounds} rounds):")
    results["techniques"] = {}
    for tname, contenders in TECHNIQUES.items():
        for wname, w in list(chosen.items())[:1 if args.quick else None]:  # quick: the first
            ratios, spread, seconds = compare(w, contenders, rounds, device)
            results["techniques"].setdefault(tname, {})[wname] = {
                "ratios": ratios, "middle_half": spread, "seconds": seconds}
            bare = (f"; against the bare loop {ratios['fit'] / ratios['hand_bare']:.3f}"
                    if "hand_bare" in ratios else "")
            print(f"  {tname:<14} {wname:<52} fit {ratios['fit']:.3f} "
                  f"({spread['fit'][0]:.2f}-{spread['fit'][1]:.2f}; hand {seconds['hand']:.2f} s"
                  f"{bare})")
    if device.type == "cuda":
        print("\nfit in bf16 against fit in fp32, the same workloads (time ratio):")
        results["bf16_vs_fp32"] = {}
        for wname, w in chosen.items():
            ratios, _, seconds = compare(w, {"hand": fit_call(0), "bf16": fit_call(
                0, precision="bf16")}, rounds, device)
            results["bf16_vs_fp32"][wname] = {"ratio": ratios["bf16"], "seconds": seconds}
            print(f"  {wname:<52} bf16 / fp32 {ratios['bf16']:.3f} "
                  f"(fp32 {seconds['hand']:.2f} s)")

    costs = overhead(device, args.quick)
    print(f"\nthe loop's own cost beside the hand loop (metric and validation on): "
          f"{costs['per step']:.1f} us per step, {costs['per epoch']:.0f} us per epoch")
    results["overhead_us"] = costs
    scale = scaling(device, args.quick)
    base = scale[1]
    print("scaling (fit, housing workload, 1 epoch): "
          + ", ".join(f"{k}x rows {t:.2f}s ({t / base / k:.2f} per row of 1x)"
                      for k, t in scale.items()))
    mem = memory(device, args.quick)
    print(f"memory over {mem['epochs']} pima epochs: RSS {mem['rss_epoch_2_mb']:.1f} MB after "
          f"epoch 2, {mem['rss_last_mb']:.1f} MB after epoch {mem['epochs']} "
          f"({mem['rss_last_mb'] - mem['rss_epoch_2_mb']:+.1f} MB)"
          + (f"; CUDA {mem['cuda_epoch_2_mb']:.1f} -> {mem['cuda_last_mb']:.1f} MB"
             if device.type == "cuda" else ""))
    plot_ms = plot_speed()
    n = 1 if args.quick else 5
    imports = {"plots_ascii": import_ms("plots_ascii", runs=n)}
    if not args.quick:  # each a process importing torch, seconds of CPU: not in a smoke run
        imports["loops (torch already imported)"] = import_ms("loops", after="torch", runs=n)
        imports["torch"] = import_ms("torch", runs=n)
    print(f"plots_ascii.line_plot, 10,000 points at 72x18: {plot_ms:.1f} ms")
    print("import: " + ", ".join(f"{k} {v:.1f} ms" for k, v in imports.items()))
    results.update(scaling={str(k): v for k, v in scale.items()}, memory=mem,
                   line_plot_10k_ms=plot_ms, import_ms=imports)
    if device.type == "cuda":
        syncs = cuda_syncs(device)
        print(f"CUDA synchronisations per epoch ({syncs['steps_per_epoch']} steps): "
              + ", ".join(f"{k} {v:.1f}" for k, v in syncs.items() if k != "steps_per_epoch"))
        results["cuda_syncs_per_epoch"] = syncs
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
