"""fit under torchrun: 2 CPU processes, gloo, localhost only (real launches, real kills)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import torch

import loops
from test_loops import ctrl_c_as_usual

HERE = os.path.dirname(os.path.abspath(__file__))

# One script for every launch; what it does is chosen by its arguments.
CHILD = r"""
import json, os, sys, time, torch
import loops
mode, out, ck, epochs, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 6, generator=g)
    y = (X[:, :1] + 0.3 * torch.randn(100, 1, generator=g) > 0).float()
    Xv = torch.randn(37, 6, generator=g)
    return (X, y), (Xv, (Xv[:, :1] > 0).float())

class Net(torch.nn.Module):
    def __init__(self, dropout, slow):
        super().__init__()
        self.slow = slow
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(8, 1),
                                       torch.nn.Sigmoid())
    def forward(self, x):
        if self.slow:
            time.sleep(self.slow)
        return self.net(x)

train, val = data()
torch.manual_seed(0)
rank = int(os.environ.get("RANK", "0"))
metrics = {"acc": "binary_accuracy", "f1": "f1", "max": "max_error"}
parts = mode.split("+")  # "faults+accumulate": both, in one launch
if "faults" in parts:
    torch.distributed.init_process_group("gloo")
    report = {}
    try:  # a plain model under a group of 2
        loops.fit(Net(0, 0), train, torch.nn.BCELoss(), torch.optim.SGD(Net(0, 0).parameters(), 0.1),
                  epochs=1, verbose=0)
    except ValueError as e:
        report["unwrapped"] = str(e)
    model, _ = loops.setup_distributed(Net(0, 0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=8)
    try:  # a DataLoader that would give every rank every batch
        loops.fit(model, loader, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=1, verbose=0)
    except ValueError as e:
        report["sampler"] = str(e)
    X, y = train
    if rank == 1:  # a NaN in rank 1's half of the second global batch (rows 24-31)
        X = X.clone()
        X[16 + 8 + 3] = float("nan")
    model, _ = loops.setup_distributed(Net(0, 0))
    try:
        loops.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.1),
                  epochs=3, batch_size=batch, shuffle=False, verbose=0)
    except FloatingPointError as e:
        report["nan"] = str(e)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)

if "accumulate" in parts:
    torch.manual_seed(0)  # as if first: the faults part drew for its models  # 2 batches of 8 per rank and step; count the gradient all-reduces
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    model, _ = loops.setup_distributed(Net(0, 0))
    reduces = [0]
    def counting(state, bucket):
        reduces[0] += 1
        return default_hooks.allreduce_hook(torch.distributed.group.WORLD, bucket)
    model.register_comm_hook(None, counting)
    h = loops.fit(model, train, torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                  epochs=epochs, batch_size=batch, accumulate=2, seed=1, verbose=0,
                  metrics={"acc": "binary_accuracy"})
    torch.save({"history": h, "model": loops._unwrap(model).state_dict(),
                "reduces": reduces[0]}, f"{out}/rank{rank}.pt")

if "faults" in parts or "accumulate" in parts:
    loops._leave_group()  # barrier, then destroy: leaving alone can abort the other rank
    sys.exit(0)

dropout, slow = (0.2, 0.03) if mode == "resume" else (0.0, 0)
model, device = loops.setup_distributed(Net(dropout, slow))
opt = torch.optim.Adam(model.parameters(), 0.01)
print("started", flush=True)
h = loops.fit(model, train, torch.nn.BCELoss(), opt, epochs=epochs, val=val, batch_size=batch,
              seed=1, metrics=metrics, checkpoint=ck if ck != "-" else None,
              resume=mode == "resume", verbose=2)
torch.save({"history": h, "model": loops._unwrap(model).state_dict()}, f"{out}/rank{rank}.pt")
"""


def torchrun(*args, ranks=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", CHILD_PATH, *map(str, args)]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, preexec_fn=ctrl_c_as_usual,
                         env={**os.environ, "PYTHONPATH": HERE, "PYTHONUNBUFFERED": "1",
                              "OMP_NUM_THREADS": "1"})
    if not wait:
        return p
    out, err = p.communicate(timeout=180)
    return p.returncode, out, err


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
    """SIGKILL a torchrun job at once: its workers first, then the agent."""
    for pid in descendants(p.pid)[::-1] + [p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate(timeout=300)


def wait_for_epoch(last, epoch, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(last) and loops.load_checkpoint(last)["epoch"] >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"{last} did not reach epoch {epoch} in {timeout} s")


def worker_of_rank(p, rank):
    """The pid of the torchrun worker of ``rank`` (its environment says RANK=rank)."""
    for pid in descendants(p.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no worker of rank {rank}")


_REFERENCE = []


def without_time(h):
    return {k: v for k, v in h.items() if k != "time"}


CHILD_PATH = None


# The jobs that depend on nothing else, started together at the module's set-up (their
# processes mostly import torch, which two cores do side by side): name -> (process, out,
# checkpoint directory, the directory holding both).
JOBS = {}


def setUpModule():
    global CHILD_PATH
    d = tempfile.mkdtemp()
    CHILD_PATH = os.path.join(d, "child.py")
    with open(CHILD_PATH, "w") as f:
        f.write(CHILD)
    for mode, epochs, saves in (("fit", 3, True), ("faults+accumulate", 2, False),
                                ("resume", 5, True)):
        where = tempfile.TemporaryDirectory()
        out, ck = os.path.join(where.name, "out"), os.path.join(where.name, "run")
        os.mkdir(out)
        JOBS[mode] = (torchrun(mode, out, ck if saves else "-", epochs, 8, wait=False),
                      out, ck, where)
    where = tempfile.TemporaryDirectory()  # examples/housing.py, its runs in where
    JOBS["housing recipe"] = (subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(HERE, "examples", "housing.py"), "--quick", "--runs", where.name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}), where.name, None, where)


def tearDownModule():
    for p, _, _, where in JOBS.values():
        if p.poll() is None:  # not read by any test that ran: stopped
            kill_job(p)
        else:
            p.communicate()
        where.cleanup()
    JOBS.clear()


def job(mode):
    """(exit code, stdout, stderr, out, checkpoint directory) of the job started for
    ``mode`` at the module's set-up."""
    if not JOBS:
        setUpModule()  # a test run without its module's set-up
    p, out, ck, _ = JOBS[mode]
    if not hasattr(p, "said"):  # read once; two tests may read one job
        p.said = p.communicate(timeout=600)
    return p.returncode, *p.said, out, ck


class DistributedTest(unittest.TestCase):
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

    def tmp(self):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        return d.name

    def test_two_ranks_at_b_follow_one_process_at_2b_and_agree_on_the_whole_set(self):
        rc, stdout, err, out, ck = job("fit")
        self.assertEqual(rc, 0, err[-3000:])
        r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
        # every rank holds the same history (reduced once per epoch) and the same weights
        self.assertEqual(without_time(r0["history"]), without_time(r1["history"]))
        for k in r0["model"]:
            self.assertTrue(torch.equal(r0["model"][k], r1["model"][k]))
        # one process at batch 16 (100 rows: 6 global batches of 16, then 4 = 2 per rank)
        g = torch.Generator().manual_seed(0)
        X = torch.randn(100, 6, generator=g)
        y = (X[:, :1] + 0.3 * torch.randn(100, 1, generator=g) > 0).float()
        Xv = torch.randn(37, 6, generator=g)
        yv = (Xv[:, :1] > 0).float()
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
        self.assertEqual(len([ln for ln in stdout.splitlines() if ln.startswith("epoch ")]), 3)
        keys = torch.load(os.path.join(ck, "last.pt"), weights_only=True)["model"].keys()
        self.assertEqual(set(keys), set(r0["model"]))  # saved unwrapped: no "module." prefix
        self.assertFalse(any(k.startswith("module.") for k in keys))

    def test_accumulation_under_ddp_reduces_once_a_step_and_follows_the_big_batch(self):
        rc, _, err, out, _ = job("faults+accumulate")
        self.assertEqual(rc, 0, err[-3000:])
        r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
        # 100 rows, global batches of 16: 7 batches an epoch in 4 groups (2, 2, 2, 1);
        # the gradients are all-reduced once per group (no_sync for the first batch)
        self.assertEqual(r0["reduces"], 2 * 4)
        self.assertEqual(r1["reduces"], 2 * 4)
        self.assertEqual(without_time(r0["history"]), without_time(r1["history"]))
        # one process, one batch of 2 ranks x 2 batches x 8 = 32 rows a step
        g = torch.Generator().manual_seed(0)
        X = torch.randn(100, 6, generator=g)
        y = (X[:, :1] + 0.3 * torch.randn(100, 1, generator=g) > 0).float()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0),
                                    torch.nn.Linear(8, 1), torch.nn.Sigmoid())
        h = loops.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters(), 0.01),
                      epochs=2, batch_size=32, seed=1, verbose=0,
                      metrics={"acc": "binary_accuracy"})
        single = self.assertFollows(model, h, r0)

    def reference(self):
        """Each rank's result of the "resume" run when nothing stops it (run once)."""
        if not _REFERENCE:
            rc, _, err, ref_out, _ = job("resume")
            self.assertEqual(rc, 0, err[-3000:])
            _REFERENCE.extend(torch.load(os.path.join(ref_out, f"rank{r}.pt"),
                                         weights_only=True) for r in (0, 1))
        return _REFERENCE

    def test_ctrl_c_on_one_rank_ends_the_job_at_once_and_a_killed_run_resumes(self):
        # A SIGINT to rank 1 hung every rank for gloo's 30 minutes (rank 1 in the exit
        # barrier, rank 0 in an all-reduce); then the resumed job is SIGKILLed whole, and
        # resumed again: every rank ends as the uninterrupted run
        out, ck = self.tmp(), os.path.join(self.tmp(), "run")
        last = os.path.join(ck, "last.pt")
        p = torchrun("resume", out, ck, 5, 8, wait=False)
        self.addCleanup(lambda: p.poll() is None and kill_job(p))
        wait_for_epoch(last, 1)
        os.kill(worker_of_rank(p, 1), signal.SIGINT)
        t0 = time.time()
        _, err = p.communicate(timeout=300)
        self.assertLess(time.time() - t0, 300)  # not gloo's 30 minutes
        self.assertNotEqual(p.returncode, 0)
        self.assertRegex(err, r"\[rank1\]: KeyboardInterrupt")
        interrupted_at = loops.load_checkpoint(last)["epoch"]
        q = torchrun("resume", out, ck, 5, 8, wait=False)
        self.addCleanup(lambda: q.poll() is None and kill_job(q))
        wait_for_epoch(last, interrupted_at + 1)  # kill the whole job once it went on
        kill_job(q)
        self.assertLess(loops.load_checkpoint(last)["epoch"], 5)  # killed before the end
        rc, _, err = torchrun("resume", out, ck, 5, 8)
        self.assertEqual(rc, 0, err[-3000:])
        for r, ref in enumerate(self.reference()):
            got = torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True)
            self.assertEqual(without_time(got["history"]), without_time(ref["history"]))
            for k in ref["model"]:
                self.assertTrue(torch.equal(ref["model"][k], got["model"][k]), k)

    def test_nan_on_one_rank_stops_every_rank_and_a_plain_model_is_refused(self):
        rc, _, err, out, _ = job("faults+accumulate")
        self.assertEqual(rc, 0, err[-3000:])
        reports = []
        for r in (0, 1):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                reports.append(json.load(f))
        self.assertEqual(reports[0], reports[1])  # the same errors on both ranks
        self.assertIn("not wrapped in DistributedDataParallel", reports[0]["unwrapped"])
        self.assertIn("needs a DistributedSampler", reports[0]["sampler"])
        self.assertRegex(reports[0]["nan"], r"^epoch 1: loss is nan at step 2 on rank 1")


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


if __name__ == "__main__":
    unittest.main()
