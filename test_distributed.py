"""fit under torchrun: 2 CPU processes, gloo, localhost only (real launches, real kills)."""
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import torch

import loops
from test_loops import ctrl_c_as_usual

HERE = os.path.dirname(os.path.abspath(__file__))

# The children's data, also rebuilt here for the one-process runs they are compared with.
DATA = r"""
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 6, generator=g)
    y = (X[:, :1] + 0.3 * torch.randn(100, 1, generator=g) > 0).float()
    Xv = torch.randn(37, 6, generator=g)
    return (X, y), (Xv, (Xv[:, :1] > 0).float())
"""

# One script for every launch; what it does is chosen by its arguments.
CHILD = r"""
import json, os, sys, time, torch
import loops
mode, out, ck, epochs, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
""" + DATA + r"""

class Net(torch.nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(8, 1),
                                       torch.nn.Sigmoid())
    def forward(self, x):
        return self.net(x)

train, val = data()
torch.manual_seed(0)
rank = int(os.environ.get("RANK", "0"))
metrics = {"acc": "binary_accuracy", "f1": "f1", "max": "max_error"}
saved = "rank"  # the name of each rank's results: out/rank0.pt, ...
# SIGNAL=r:k:NAME: rank r sends itself SIGNAL (a Ctrl-C, a kill -9) after global step k
who, at, name = (os.environ.get("SIGNAL") or "-1:0:INT").split(":")
def on_batch_end(step, loss):
    if rank == int(who) and step == int(at):
        import signal
        os.kill(os.getpid(), getattr(signal, "SIG" + name))
def ddp_run(kind, ck, epochs, saved):  # "fit": dropout 0; "resume": 0.2, resumed
    torch.manual_seed(0)
    model, device = loops.setup_distributed(Net(0.2 if kind == "resume" else 0.0))
    opt = torch.optim.Adam(model.parameters(), 0.01)
    h = loops.fit(model, train, torch.nn.BCELoss(), opt, epochs=epochs, val=val,
                  batch_size=batch, seed=1, metrics=metrics, checkpoint=ck,
                  resume=kind == "resume", verbose=2, on_batch_end=on_batch_end)
    torch.save({"history": h, "model": loops._unwrap(model).state_dict()},
               f"{out}/{saved}{rank}.pt")

if mode == "all":  # DDP: faults, accumulation, a fit, the DDP chain's reference; then sharded
    torch.distributed.init_process_group("gloo")
    import atexit  # the group is ours, not setup_distributed's: leave it together at the end
    atexit.register(loops._leave_group)  # (a rank leaving alone can abort the other's gloo)
    report = {}
    try:  # a plain model under a group of 2
        loops.fit(Net(0), train, torch.nn.BCELoss(), torch.optim.SGD(Net(0).parameters(), 0.1),
                  epochs=1, verbose=0)
    except ValueError as e:
        report["unwrapped"] = str(e)
    model, _ = loops.setup_distributed(Net(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=8)
    try:  # a DataLoader that would give every rank every batch
        loops.fit(model, loader, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=1, verbose=0)
    except ValueError as e:
        report["sampler"] = str(e)
    from torch.utils.data.distributed import DistributedSampler
    val_set = torch.utils.data.TensorDataset(*val)  # 37 rows: the sampler repeats one
    try:
        loops.fit(model, train, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=1, verbose=0, val=torch.utils.data.DataLoader(
                      val_set, batch_size=8, sampler=DistributedSampler(val_set, shuffle=False)))
    except ValueError as e:
        report["val sampler"] = str(e)
    X, y = train
    if rank == 1:  # a NaN in rank 1's half of the second global batch (rows 24-31)
        X = X.clone()
        X[16 + 8 + 3] = float("nan")
    model, _ = loops.setup_distributed(Net(0))
    try:
        loops.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=3, batch_size=batch, shuffle=False, verbose=0)
    except FloatingPointError as e:
        report["nan"] = str(e)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)

    torch.manual_seed(0)  # as if first: the faults part drew for its models
    # 2 batches of 8 per rank and step; count the gradient all-reduces
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    model, _ = loops.setup_distributed(Net(0))
    reduces = [0]
    def counting(state, bucket):
        reduces[0] += 1
        return default_hooks.allreduce_hook(torch.distributed.group.WORLD, bucket)
    model.register_comm_hook(None, counting)
    h = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                  epochs=2, batch_size=batch, accumulate=2, seed=1, verbose=0,
                  metrics={"acc": "binary_accuracy"})
    torch.save({"history": h, "model": loops._unwrap(model).state_dict(),
                "reduces": reduces[0]}, f"{out}/accumulate{rank}.pt")
    ddp_run("fit", ck, 3, "rank")
    ddp_run("resume", ck + "-reference", 5, "reference")  # the DDP chain's, uninterrupted


if mode == "all":  # FSDP2: a sharded fit as "fit" does, then the rest on the same group
    torch.manual_seed(0)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    from torch.distributed.fsdp import fully_shard
    whole = lambda m: get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))
    model, _ = loops.setup_distributed(Net(0), shard=True)
    h = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                  epochs=epochs, val=val, batch_size=batch, seed=1, metrics=metrics,
                  checkpoint=ck + "-sharded", verbose=0)
    report = {"history": h, "model": whole(model)}
    torch.manual_seed(0)  # accumulation and clipping: 2 batches of 8 a rank and step
    model, _ = loops.setup_distributed(Net(0), shard=True)
    report["accumulate"] = loops.fit(
        model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01), epochs=2,
        batch_size=batch, accumulate=2, clip_grad_norm=0.05, seed=1, verbose=0,
        metrics={"acc": "binary_accuracy"})
    report["accumulate_model"] = whole(model)
    g = torch.Generator().manual_seed(5)  # 65 validation rows at batch 32 over 2 ranks
    Xv = torch.randn(65, 6, generator=g)
    report["val65"] = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.SGD(
        model.parameters(), 0.0), epochs=1, batch_size=batch, val=(Xv, (Xv[:, :1] > 0).float()),
        val_batch_size=32, metrics={"acc": "binary_accuracy", "max": "max_error"}, verbose=0)
    report["val65_model"] = whole(model)
    report["evaluate"] = loops.evaluate(model, (Xv, (Xv[:, :1] > 0).float()), torch.nn.BCELoss())
    report["predict"] = loops.predict(model, Xv, batch_size=16)
    before = whole(model)
    report["lr_find"] = loops.lr_find(model, train, torch.nn.BCELoss(), torch.optim.Adam(
        model.parameters()), steps=20)["suggestion"]
    report["lr_find_kept"] = all(torch.equal(v, whole(model)[k]) for k, v in before.items())
    torch.manual_seed(0)  # bf16 through FSDP's MixedPrecisionPolicy; sharded by class
    model, _ = loops.setup_distributed(Net(0), shard={torch.nn.Linear}, precision="bf16")
    opt = torch.optim.Adam(model.parameters(), 0.01)
    report["bf16"] = loops.fit(model, train, torch.nn.BCELoss(), opt, epochs=epochs,
                               batch_size=batch, seed=1, verbose=0)
    report["bf16_dtypes"] = sorted({str(t.dtype) for t in [*model.parameters(), *(
        v for st in opt.state.values() for v in st.values() if v.dim())]})
    def optimizer_first():
        net = Net(0)
        opt = torch.optim.SGD(net.parameters(), 0.1)  # over the parameters before sharding
        return loops.setup_distributed(net, shard=True)[0], opt
    def mixed():
        net = Net(0)
        fully_shard(net, ignored_params={net.net[0].weight})  # left a plain tensor
        return net, torch.optim.SGD(net.parameters(), 0.1)
    def sharded():
        m = loops.setup_distributed(Net(0), shard=True)[0]
        return m, torch.optim.SGD(m.parameters(), 0.1)
    errors = report["errors"] = {}
    for name, make in (("optimizer first", optimizer_first), ("precision", sharded),
                       ("mixed", mixed)):
        m, o = make()
        try:
            loops.fit(m, train, torch.nn.BCELoss(), o, epochs=1, verbose=0, clip_grad_norm=1.0,
                      precision="bf16" if name == "precision" else None)
        except ValueError as e:
            errors[name] = str(e)
    X, y = train  # a NaN in rank 1's half of the second global batch (rows 24-31)
    if rank == 1:
        X = X.clone()
        X[16 + 8 + 3] = float("nan")
    model, _ = loops.setup_distributed(Net(0), shard=True)
    try:
        loops.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=2, batch_size=batch, shuffle=False, verbose=0)
    except FloatingPointError as e:
        report["nan"] = str(e)
    def poison(step, loss):  # a NaN written into rank 1's shard of one weight, loss finite
        if rank == 1 and step == 7:
            with torch.no_grad():
                model.net[0].weight.to_local().fill_(float("nan"))
    model, _ = loops.setup_distributed(Net(0), shard=True)
    try:
        loops.fit(model, train, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=2, batch_size=batch, verbose=0, checkpoint=ck + "-poisoned",
                  on_batch_end=poison)
    except FloatingPointError as e:
        report["poisoned"] = str(e)
    class Tied(torch.nn.Module):  # an embedding and a head that share one weight
        def __init__(self):
            super().__init__()
            self.emb, self.mid = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
        def forward(self, x):
            return self.head(torch.relu(self.mid(self.emb(x))))
    torch.manual_seed(0)
    model, _ = loops.setup_distributed(Tied(), shard=True)
    tokens = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(3))
    report["tied"] = loops.fit(model, (tokens, tokens), torch.nn.CrossEntropyLoss(),
                               torch.optim.Adam(model.parameters(), 0.05), epochs=3,
                               batch_size=8, val=(tokens, tokens), seed=0, verbose=0)
    for name, make in (("tied class", lambda: loops.setup_distributed(
            Tied(), shard=(torch.nn.Embedding,))), ("module dict", lambda: loops.setup_distributed(
            torch.nn.ModuleDict({"G": torch.nn.Linear(2, 2)}), shard=True))):
        try:
            make()
        except ValueError as e:
            errors[name] = str(e)
    torch.save(report, f"{out}/shard{rank}.pt")
    # then the kill chains' reference: their run, uninterrupted
    mode, ck, epochs, saved = "shard-resume-sharded", ck + "-shard-reference", 5, "shard-reference"
    torch.manual_seed(0)

if mode.startswith("shard-resume"):  # "shard-resume-full" / "-sharded"; DIE=k: rank 0 dies
    model, _ = loops.setup_distributed(Net(0.2), shard=True,  # after epoch k's shards,
                                       checkpoints=mode.rsplit("-", 1)[1])  # before last.pt
    die, write, saves = int(os.environ.get("DIE", "0")), loops._atomic_write, []
    def dying(path, what):  # rank 0 writes last.pt after every rank wrote its shards
        saves.append(path.endswith("last.pt"))
        if sum(saves) == die and saves[-1]:
            os._exit(9)
        write(path, what)
    loops._atomic_write = dying
    h = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                  epochs=epochs, val=val, batch_size=batch, seed=1, metrics=metrics,
                  checkpoint=ck, resume=True, verbose=2, on_batch_end=on_batch_end,
                  restore_best=True)  # best.pt loaded back into the shards at the end
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    torch.save({"history": h, "model": get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True))}, f"{out}/{saved}{rank}.pt")
    sys.exit(0)

if mode == "resume":  # the DDP chain's launches
    ddp_run("resume", ck, epochs, "rank")

if mode == "alone":  # a sharded model's evaluate called on rank 0 only
    model, _ = loops.setup_distributed(Net(0), shard=True)
    loops._RANKS_WAIT, said, t0 = 3, "", time.time()
    if rank == 0:
        try:
            loops.evaluate(model, val, torch.nn.BCELoss())
        except RuntimeError as e:
            said = str(e)
    else:
        time.sleep(8)  # the other rank is elsewhere, and calls no collective
    with open(f"{out}/alone{rank}.json", "w") as f:
        json.dump({"said": said, "seconds": time.time() - t0}, f)
    os._exit(0)  # the group has a collective that timed out: leave without its teardown
"""


def torchrun(*args, ranks=2, wait=True, env=None, script=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", script or CHILD_PATH, *map(str, args)]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, preexec_fn=ctrl_c_as_usual,
                         env={**os.environ, "PYTHONPATH": HERE, "PYTHONUNBUFFERED": "1",
                              "OMP_NUM_THREADS": "1", **(env or {})})
    if not wait:
        return p
    out, err = p.communicate(timeout=180)
    return p.returncode, out, err


# Launches that may run at once: one while the other modules' tests run (they keep about
# one of the two cores busy), two once this module's tests wait for them (setUpModule).
SLOTS = threading.Semaphore(1)


class Chain(threading.Thread):
    """torchrun launches one after another in a thread, each ``(args, env, ranks)`` of the
    child script (or ``(args, env, ranks, script)``): the sequences of kills and resumes
    run beside the other tests. ``results``: (exit code, stdout, stderr, seconds) of each,
    once ``join``ed."""

    def __init__(self, *launches):
        super().__init__(daemon=True)
        self.launches, self.results, self.p, self.stopped = launches, [], None, False
        self.start()

    def run(self):
        for args, env, ranks, *script in self.launches:
            with SLOTS:
                if self.stopped:
                    return
                t0 = time.time()
                self.p = torchrun(*args, env=env, ranks=ranks, wait=False, script=script and
                                  script[0])
                out, err = self.p.communicate(timeout=600)
                self.results.append((self.p.returncode, out, err, time.time() - t0))

    def stop(self):
        self.stopped = True
        if self.p is not None and self.p.poll() is None:
            kill_job(self.p)


def descendants(pid):
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_job(p):
    """SIGKILL a torchrun job at once: its workers first, then the agent (whoever waits
    for it reads its end)."""
    for pid in descendants(p.pid)[::-1] + [p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def without_time(h):
    return {k: v for k, v in h.items() if k != "time"}


CHILD_PATH = None


# The jobs, started when this module is imported: test discovery imports every module
# before the first test runs, so they run beside the other modules' tests (see SLOTS):
# name -> (Chain, out, checkpoint directory, the directory holding both).
JOBS = {}


def start_jobs():
    global CHILD_PATH
    if JOBS:
        return
    atexit.register(tearDownModule)  # however the run ends, no launch outlives it
    d = tempfile.mkdtemp()
    CHILD_PATH = os.path.join(d, "child.py")
    with open(CHILD_PATH, "w") as f:
        f.write(CHILD)
    where = tempfile.TemporaryDirectory()  # one launch for the jobs that need no other,
    out, ck = os.path.join(where.name, "out"), os.path.join(where.name, "run")  # then the
    os.mkdir(out)                                    # sharded reference run on 3 ranks
    os.mkdir(out + "3")
    JOBS["all"] = (Chain((("all", out, ck, 3, 8), {}, 2), (
        ("shard-resume-sharded", out + "3", ck + "-shard-reference", 6, 8), {}, 3),
        (("alone", out, ck + "-alone", 1, 8), {}, 2)), out, ck, where)
    where = tempfile.TemporaryDirectory()  # DDP: a kill -9 of rank 0 in epoch 2, then on
    out, ck = os.path.join(where.name, "out"), os.path.join(where.name, "run")
    os.mkdir(out)
    args = ("resume", out, ck, 5, 8)
    JOBS["ddp chain"] = (Chain((args, {"SIGNAL": "0:10:KILL"}, 2), (args, {}, 2)), out, ck, where)
    where = tempfile.TemporaryDirectory()  # a sharded run stopped 4 times, then to its end
    out, ck = os.path.join(where.name, "out"), os.path.join(where.name, "run")
    os.mkdir(out)
    full, sharded = ("shard-resume-full", out, ck, 5, 8), ("shard-resume-sharded", out, ck, 5, 8)
    JOBS["shard chain"] = (Chain(
        (full, {"SIGNAL": "1:10:INT"}, 2),  # full checkpoints: a Ctrl-C on rank 1 in epoch 2,
        (full, {"SIGNAL": "0:17:KILL"}, 2),  # a kill -9 of rank 0 in epoch 3; then sharded:
        (sharded, {"DIE": "2"}, 2),  # rank 0 dies between epoch 4's shards and last.pt,
        (sharded, {"SIGNAL": "1:31:KILL"}, 2),  # a kill -9 of rank 1 in epoch 5
        (sharded, {}, 2)), out, ck, where)
    where = tempfile.TemporaryDirectory()  # examples/housing.py, its runs in where
    JOBS["housing recipe"] = (Chain((("--quick", "--runs", where.name), {}, 2, os.path.join(
        HERE, "examples", "housing.py"))), where.name, None, where)


def setUpModule():
    start_jobs()  # when imported without running (python -c), or after tearDownModule
    SLOTS.release()  # this module's tests wait for the jobs now: two at once


def tearDownModule():
    for chain, _, _, where in JOBS.values():
        chain.stop()
        chain.join(timeout=300)
        where.cleanup()
    JOBS.clear()


def job(mode):
    """(exit code, stdout, stderr, out, checkpoint directory) of the job started for
    ``mode`` (its first launch)."""
    start_jobs()  # a test run without its module's set-up
    chain, out, ck, _ = JOBS[mode]
    chain.join(timeout=1800)
    return (*chain.results[0][:3], out, ck)  # its first launch's


class JobTest(unittest.TestCase):
    def chain(self, name):
        """The results of the Chain ``name`` started at the module's set-up, and its out
        and checkpoint directories."""
        start_jobs()
        c, out, ck, _ = JOBS[name]
        c.join(timeout=1800)
        return c.results, out, ck

    def assertSameRun(self, out, reference, saved):
        """Each rank's history and weights in ``out`` are those of job ``reference``'s
        files ``saved``0.pt, ... (an uninterrupted run): bit for bit. Returns rank 0's."""
        rc, _, err, ref_out, _ = job(reference)
        self.assertEqual(rc, 0, err[-3000:])
        for r in (1, 0):
            ref = torch.load(os.path.join(ref_out, f"{saved}{r}.pt"), weights_only=True)
            got = torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True)
            self.assertEqual(without_time(got["history"]), without_time(ref["history"]))
            for k in ref["model"]:
                self.assertTrue(torch.equal(ref["model"][k], got["model"][k]), k)
        return ref


class DistributedTest(JobTest):
    def assertFollows(self, model, h, r0):
        """The one-process run (model, history h) against rank 0's: equal up to rounding.
        Returns rank 0's weights under the plain model's names."""
        single = {k.replace("net.", ""): v for k, v in r0["model"].items()}
        for k, v in model.state_dict().items():
            self.assertTrue(torch.allclose(v, single[k], atol=1e-6), k)
        for k in without_time(h):
            for a, b in zip(h[k], r0["history"][k]):
                self.assertAlmostEqual(a, b, delta=1e-5 * max(1, abs(a)), msg=k)
        return single

    def test_two_ranks_at_b_follow_one_process_at_2b_and_agree_on_the_whole_set(self):
        rc, stdout, err, out, ck = job("all")
        self.assertEqual(rc, 0, err[-3000:])
        r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
        # every rank holds the same history (reduced once per epoch) and the same weights
        self.assertEqual(without_time(r0["history"]), without_time(r1["history"]))
        for k in r0["model"]:
            self.assertTrue(torch.equal(r0["model"][k], r1["model"][k]))
        # one process at batch 16 (100 rows: 6 global batches of 16, then 4 = 2 per rank)
        (X, y), (Xv, yv) = children_data()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0),
                                    torch.nn.Linear(8, 1), torch.nn.Sigmoid())
        h = loops.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                      epochs=3, val=(Xv, yv), batch_size=16, seed=1, verbose=0,
                      metrics={"acc": "binary_accuracy", "f1": "f1", "max": "max_error"})
        single = self.assertFollows(model, h, r0)
        # the validation values are those of the whole set, not of one rank's share
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0),
                                  torch.nn.Linear(8, 1), torch.nn.Sigmoid())
        net.load_state_dict(single)
        whole = loops.evaluate(net, (Xv, yv), torch.nn.BCELoss(),
                               metrics={"acc": "binary_accuracy", "f1": "f1", "max": "max_error"})
        for k, v in whole.items():
            self.assertAlmostEqual(r0["history"]["val_" + k][-1], v, delta=1e-6)
        # one writer, one speaker
        self.assertEqual(sorted(os.listdir(ck)), ["best.pt", "history.csv", "last.pt", "run.json"])
        self.assertEqual(len([ln for ln in stdout.splitlines() if ln.startswith("epoch ")
                              and "/3 " in ln]), 3)  # (then the reference run's, of 5)
        keys = torch.load(os.path.join(ck, "last.pt"), weights_only=True)["model"].keys()
        self.assertEqual(set(keys), set(r0["model"]))  # saved unwrapped: no "module." prefix
        self.assertFalse(any(k.startswith("module.") for k in keys))

    def test_accumulation_under_ddp_reduces_once_a_step_and_follows_the_big_batch(self):
        rc, _, err, out, _ = job("all")
        self.assertEqual(rc, 0, err[-3000:])
        r0 = torch.load(os.path.join(out, "accumulate0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(out, "accumulate1.pt"), weights_only=True)
        # 100 rows, global batches of 16: 7 batches an epoch in 4 groups (2, 2, 2, 1);
        # the gradients are all-reduced once per group (no_sync for the first batch)
        self.assertEqual(r0["reduces"], 2 * 4)
        self.assertEqual(r1["reduces"], 2 * 4)
        self.assertEqual(without_time(r0["history"]), without_time(r1["history"]))
        # one process, one batch of 2 ranks x 2 batches x 8 = 32 rows a step
        (X, y), _ = children_data()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0),
                                    torch.nn.Linear(8, 1), torch.nn.Sigmoid())
        h = loops.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                      epochs=2, batch_size=32, seed=1, verbose=0,
                      metrics={"acc": "binary_accuracy"})
        self.assertFollows(model, h, r0)

    def test_a_rank_killed_mid_epoch_resumes_bit_identical(self):
        # (a Ctrl-C on one rank: ShardedTest, through the same world as DDP's)
        (kill, end), out, _ = self.chain("ddp chain")
        self.assertNotEqual(kill[0], 0)
        self.assertIn("epoch 1/5", kill[1])
        self.assertNotIn("epoch 2/5", kill[1])
        self.assertEqual(end[0], 0, end[2][-3000:])
        self.assertIn("at epoch 2 of 5", end[1])
        self.assertSameRun(out, "all", "reference")


    def test_nan_on_one_rank_stops_every_rank_and_a_plain_model_is_refused(self):
        rc, _, err, out, _ = job("all")
        self.assertEqual(rc, 0, err[-3000:])
        reports = []
        for r in (0, 1):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                reports.append(json.load(f))
        self.assertEqual(reports[0], reports[1])  # the same errors on both ranks
        self.assertIn("not wrapped in DistributedDataParallel", reports[0]["unwrapped"])
        self.assertIn("needs a DistributedSampler", reports[0]["sampler"])
        self.assertRegex(reports[0]["nan"], r"^epoch 1: loss is nan at step 2 on rank 1")
        # a DistributedSampler pads validation (37 rows over 2 ranks: one counted twice,
        # 23/38 where the set gives 23/37): refused, saying what to pass instead
        self.assertIn("a DistributedSampler makes 37 rows even over 2 ranks",
                      reports[0]["val sampler"])
        self.assertIn("val=(X, y)", reports[0]["val sampler"])


def plain_net():
    """The children's Net, unsharded, as a user would rebuild it in one process."""
    net = torch.nn.Module()
    net.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0),
                                  torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    net.forward = net.net.forward
    return net


def children_data():
    namespace = {"torch": torch}
    exec(DATA, namespace)
    return namespace["data"]()


class ShardedTest(JobTest):
    """FSDP2 (setup_distributed(shard=True)) on 2 CPU ranks, gloo."""

    def shard_report(self):
        rc, _, err, out, ck = job("all")
        self.assertEqual(rc, 0, err[-3000:])
        return [torch.load(os.path.join(out, f"shard{r}.pt"), weights_only=True)
                for r in (0, 1)], ck + "-sharded"

    def one_process(self, **kw):
        train, _ = children_data()
        torch.manual_seed(0)
        model = plain_net()
        h = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                      seed=1, verbose=0, **kw)
        return model, h

    def test_sharded_fit_follows_one_process_at_2b_and_ddp_and_best_pt_loads_plain(self):
        (r0, r1), ck = self.shard_report()
        self.assertEqual(without_time(r0["history"]), without_time(r1["history"]))
        train, val = children_data()
        torch.manual_seed(0)
        model = plain_net()
        h = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                      epochs=3, val=val, batch_size=16, seed=1, verbose=0,
                      metrics={"acc": "binary_accuracy", "f1": "f1", "max": "max_error"})
        for k, v in model.state_dict().items():  # one process at 2b
            self.assertTrue(torch.allclose(v, r0["model"][k], atol=1e-5), k)
        for k in without_time(h):
            for a, b in zip(h[k], r0["history"][k]):
                self.assertAlmostEqual(a, b, delta=1e-5 * max(1, abs(a)), msg=k)
        rc, _, err, ddp_out, _ = job("all")  # and DistributedDataParallel
        self.assertEqual(rc, 0, err[-3000:])
        ddp = torch.load(os.path.join(ddp_out, "rank0.pt"), weights_only=True)
        for k, v in ddp["model"].items():
            self.assertTrue(torch.allclose(v, r0["model"][k], atol=1e-5), k)
        # best.pt and last.pt: the whole state, loadable into a plain model, weights_only
        self.assertEqual(sorted(os.listdir(ck)), ["best.pt", "history.csv", "last.pt", "run.json"])
        plain = plain_net()
        best = loops.load_checkpoint(os.path.join(ck, "best.pt"), plain)
        self.assertEqual(best["epoch"], r0["history"]["best_epoch"][-1])
        opt = torch.optim.Adam(plain.parameters(), 0.01)
        loops.load_checkpoint(os.path.join(ck, "last.pt"), plain, opt)
        for k, v in plain.state_dict().items():
            self.assertTrue(torch.equal(v, r0["model"][k]), k)
        self.assertEqual(len(opt.state), 4)  # Adam's moments of every parameter

    def test_accumulation_and_clipping_follow_their_unsharded_run(self):
        (r0, r1), _ = self.shard_report()
        self.assertEqual(without_time(r0["accumulate"]), without_time(r1["accumulate"]))
        model, h = self.one_process(epochs=2, batch_size=32, clip_grad_norm=0.05,
                                    metrics={"acc": "binary_accuracy"})
        for k, v in model.state_dict().items():
            self.assertTrue(torch.allclose(v, r0["accumulate_model"][k], atol=1e-5), k)
        for k in without_time(h):
            for a, b in zip(h[k], r0["accumulate"][k]):
                self.assertAlmostEqual(a, b, delta=1e-5 * max(1, abs(a)), msg=k)

    def test_65_validation_rows_neither_hang_nor_count_twice_and_evaluate_predict_lr_find(self):
        (r0, r1), _ = self.shard_report()
        g = torch.Generator().manual_seed(5)
        Xv = torch.randn(65, 6, generator=g)
        yv = (Xv[:, :1] > 0).float()
        plain = plain_net()
        plain.load_state_dict(r0["val65_model"])
        whole = loops.evaluate(plain, (Xv, yv), torch.nn.BCELoss(),
                               metrics={"acc": "binary_accuracy", "max": "max_error"})
        for k, v in whole.items():
            self.assertAlmostEqual(r0["val65"]["val_" + k][0], v, delta=1e-6, msg=k)
        self.assertEqual(round(r0["val65"]["val_acc"][0] * 65, 6) % 1, 0)  # of 65 rows
        self.assertAlmostEqual(r0["evaluate"]["loss"], whole["loss"], delta=1e-6)
        self.assertTrue(torch.allclose(r0["predict"], loops.predict(plain, Xv), atol=1e-6))
        self.assertTrue(r0["lr_find_kept"])  # lr_find leaves the sharded weights as they were
        self.assertTrue(1e-7 < r0["lr_find"] < 10)

    def test_bf16_through_fsdps_policy_keeps_fp32_state_and_mistakes_are_refused(self):
        (r0, r1), _ = self.shard_report()
        self.assertEqual(r0["bf16_dtypes"], ["torch.float32"])  # weights and Adam's moments
        fp32, bf16 = r0["history"]["loss"], r0["bf16"]["loss"]
        self.assertNotEqual(fp32, bf16)  # computed in bf16, and close to fp32's
        for a, b in zip(fp32, bf16):
            self.assertAlmostEqual(a, b, delta=0.01)
        errors = r0["errors"]
        self.assertEqual(errors, r1["errors"])
        self.assertIn("build it after", errors["optimizer first"])
        self.assertIn("setup_distributed(model, shard=True, precision='bf16')",
                      errors["precision"])
        self.assertIn("['net.0.weight'] are plain tensors", errors["mixed"])

    def test_tied_weights_shard_whole_and_what_cannot_work_is_refused_at_setup(self):
        # Tied weights failed in validation with advice setup_distributed could not follow; a
        # ModuleDict root failed inside FSDP ("containers that do not implement forward").
        (r0, r1), _ = self.shard_report()
        self.assertEqual(without_time(r0["tied"]), without_time(r1["tied"]))
        self.assertLess(r0["tied"]["val_loss"][-1], r0["tied"]["val_loss"][0])
        self.assertRegex(r0["errors"]["tied class"], r"the Embedding's \['weight'\] are tied to "
                                                     r"weights outside it.*shard=True")
        self.assertIn("is a ModuleDict, which has no forward", r0["errors"]["module dict"])

    def test_evaluate_on_one_rank_alone_says_every_rank_must_call_it(self):
        # It waited for gloo's 30-minute timeout (the common `if rank == 0:` pattern)
        rc, _, err, out, _ = job("all")
        alone = JOBS["all"][0].results[2]
        self.assertEqual(alone[0], 0, alone[2][-3000:])
        with open(os.path.join(out, "alone0.json")) as f:
            said = json.load(f)
        self.assertIn("must run on every rank together", said["said"])
        self.assertLess(said["seconds"], 60)

    def test_a_damaged_shard_directory_is_refused_naming_the_file(self):
        # 8 flipped bytes in a shard file resumed without complaint; a deleted one, or its
        # .metadata, gave raw tracebacks. consolidate reads them as a resume does.
        import shutil
        job("all")
        ck = JOBS["all"][2] + "-shard-reference"
        last = loops.load_checkpoint(os.path.join(ck, "last.pt"))
        shards = os.path.join(ck, last["shards"])
        files = sorted(os.listdir(shards))
        self.assertEqual(sorted(last["shard_sums"]), files)
        data_file = next(n for n in files if n.endswith(".distcp"))
        for name, damage in (("flipped", lambda p: self.flip(p)), ("deleted", os.remove),
                             (".metadata", None)):
            with self.subTest(name):
                copy = tempfile.mkdtemp()
                shutil.copytree(ck, copy, dirs_exist_ok=True)
                target = os.path.join(copy, last["shards"],
                                      ".metadata" if damage is None else data_file)
                (damage or os.remove)(target)
                with self.assertRaisesRegex(ValueError, "last.pt is damaged: the shard file "
                                                        f"{re.escape(os.path.basename(target))} "
                                                        "it names .* is (changed|missing)"):
                    loops.consolidate(copy)

    def flip(self, path):
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(8)
            f.seek(-8, 1)
            f.write(bytes(x ^ 0xFF for x in b))

    def test_a_nan_on_one_rank_or_in_one_ranks_shard_stops_every_rank(self):
        (r0, r1), ck = self.shard_report()
        self.assertEqual(r0["nan"], r1["nan"])
        self.assertRegex(r0["nan"], r"^epoch 1: loss is nan at step 2 on rank 1")
        # the weights' check before last.pt looks at each rank's shard, and all agree
        self.assertEqual(r0["poisoned"], r1["poisoned"])
        self.assertRegex(r0["poisoned"], r"^epoch 1: the weights hold NaN or inf \(net.0.weight\)")
        self.assertFalse(os.path.exists(ck.replace("-sharded", "-poisoned") + "/last.pt"))

    def stops(self):
        """The shard chain's launches, each checked to have stopped where it was stopped:
        resumed at epoch ``at`` (None: started afresh), trained to epoch ``to``."""
        results, out, ck = self.chain("shard chain")
        for (rc, said, err, _), at, to in zip(results, (None, 2, 3, 4, 5), (1, 2, 3, 4, 5)):
            self.assertEqual(rc == 0, to == 5, err[-3000:])
            self.assertEqual("resuming" in said, at is not None)
            if at:
                self.assertIn(f"at epoch {at} of 5", said)
            self.assertIn(f"epoch {to}/5", said)
            self.assertNotIn(f"epoch {to + 1}/5", said)
        return results, out, ck

    def test_full_checkpoints_ctrl_c_on_one_rank_then_kill_9_resume_bit_identical(self):
        (ctrl_c, *_), out, _ = self.stops()
        # a Ctrl-C (SIGINT) on rank 1 ends the job in seconds, not gloo's 30 minutes
        self.assertRegex(ctrl_c[2], r"\[rank1\]: KeyboardInterrupt")
        self.assertLess(ctrl_c[3], 300)
        self.assertSameRun(out, "all", "shard-reference")  # the end: bit for bit

    def test_sharded_checkpoints_a_death_before_the_commit_then_kill_9_resume(self):
        # rank 0 died after epoch 4's shards were written, before last.pt named them: the
        # next launch resumed at epoch 4 (checked by stops); the directory left unnamed is
        # gone after a later commit, and the run ends as if never stopped
        _, out, ck = self.stops()
        self.assertEqual(sorted(n.split(".shards.")[0] for n in os.listdir(ck)
                                if ".shards." in n), ["best.pt", "last.pt"])
        self.assertSameRun(out, "all", "shard-reference")

    def test_a_sharded_run_resumes_on_3_ranks_and_consolidates_into_plain_files(self):
        _, _, _, out, _ = job("all")
        three = JOBS["all"][0].results[1]  # the sharded reference run, on 3 ranks
        self.assertEqual(three[0], 0, three[2][-3000:])
        self.assertIn("last.pt was written by 2 processes, this run has 3", three[1])
        got = torch.load(os.path.join(out + "3", "rank0.pt"), weights_only=True)
        ref = torch.load(os.path.join(out, "shard-reference0.pt"), weights_only=True)
        self.assertEqual(got["history"]["loss"][:5], ref["history"]["loss"])
        self.assertEqual(len(got["history"]["loss"]), 6)
        ck = JOBS["all"][2] + "-shard-reference"
        last = os.path.join(ck, "last.pt")
        with self.assertRaisesRegex(ValueError, "sharded checkpoint .* loops.consolidate"):
            loops.load_checkpoint(last, plain_net())
        loops.consolidate(ck)  # plain files, no shard directories
        self.assertEqual([n for n in os.listdir(ck) if ".shards." in n], [])
        plain = plain_net()
        self.assertEqual(loops.load_checkpoint(last, plain, torch.optim.Adam(
            plain.parameters()))["epoch"], 6)
        best = loops.load_checkpoint(os.path.join(ck, "best.pt"), plain)
        self.assertEqual(best["epoch"], got["history"]["best_epoch"][-1])
        for k, v in plain.state_dict().items():  # restore_best put these into the shards
            self.assertTrue(torch.equal(v, got["model"][k]), k)


class RecipeTest(unittest.TestCase):
    def test_the_housing_recipe_under_torchrun(self):
        rc, stdout, err, runs, _ = job("housing recipe")
        self.assertEqual(rc, 0, err[-3000:])
        self.assertEqual(sorted(os.listdir(os.path.join(runs, "housing"))),
                         ["best.pt", "history.csv", "last.pt", "run.json"])
        lines = stdout.splitlines()
        self.assertEqual(len([ln for ln in lines if ln.startswith("epoch ")]), 2)  # rank 0 only
        self.assertEqual(len([ln for ln in lines if ln.startswith("test: RMSE")]), 1)


class SamplerEpochTest(unittest.TestCase):
    def test_set_epoch_is_called_every_epoch(self):
        class Sampler(torch.utils.data.Sampler):
            def __init__(self, n):
                self.n, self.epochs = n, []

            def set_epoch(self, epoch):
                self.epochs.append(epoch)

            def __iter__(self):
                return iter(range(self.n))

            def __len__(self):
                return self.n
        X, y = torch.randn(20, 3), torch.randn(20, 1)
        sampler = Sampler(20)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5,
                                             sampler=sampler)
        model = torch.nn.Linear(3, 1)
        loops.fit(model, loader, torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=3, verbose=0)
        self.assertEqual(sampler.epochs, [1, 2, 3])


start_jobs()

if __name__ == "__main__":
    unittest.main()
