"""Never lose a run: kills, resumes, failing writes, unsafe files, NaN, Ctrl-C, bad input."""
import concurrent.futures
import contextlib
import copy
import errno
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import warnings
from unittest import mock

import numpy  # noqa: F401  (imported so that snapshots carry numpy's RNG state too)
import torch

import loops
from test_loops import (DEVICE, HERE, Quiet, binary_data, ctrl_c_as_usual, mlp, regression_data,
                        same_weights)

# A run with every kind of state resume must restore: Dropout (global RNG),
# shuffling (the batch generator), Adam's moments, a StepLR schedule, and
# mid-epoch snapshots at every progress tick (save_every=0).
CHILD = r"""
import io, os, signal, sys, time, torch, loops
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
run, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "sigint-write":  # slow the bytes torch.save writes, so that a Ctrl-C lands inside
    class SlowFile(io.FileIO):
        def write(self, b):
            print("writing", flush=True)
            time.sleep(0.003)
            return super().write(b)
    real_fdopen = os.fdopen  # the checkpoint writes ("wb"), not the lock file ("r+")
    os.fdopen = lambda fd, mode="r", *a, **k: (SlowFile(fd, "wb") if mode == "wb"
                                               else real_fdopen(fd, mode, *a, **k))
hook = None
if mode in ("hook", "hold"):  # the first time, killed inside the hook of epoch 3, which
    def hook(epoch, logs):     # asks to stop ("hook") or not ("hold")
        print("hook", epoch, flush=True)
        if epoch == 3 and not os.path.exists(out + ".hooked"):
            open(out + ".hooked", "w").close()
            print("asleep", flush=True)  # killed here: the file above says it was
            time.sleep(60)
        return mode == "hook" and epoch == 3
if mode == "slow-write":  # widen the window between writing a temp file and renaming it
    real_replace = os.replace
    def slow_replace(src, dst):
        print("writing", os.path.basename(dst), flush=True)
        time.sleep(0.05)
        real_replace(src, dst)
    os.replace = slow_replace
loops._TICK_SECONDS = 0.02

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    def forward(self, x):
        time.sleep(0.002)  # slow enough for a kill to land anywhere
        return self.net(x)

g = torch.Generator().manual_seed(0)
X = torch.randn(300, 6, generator=g)
y = X.sum(1, keepdim=True) + 0.1 * torch.randn(300, 1, generator=g)
torch.manual_seed(0)
model = Net()
opt = torch.optim.Adam(model.parameters(), 1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
print("started", flush=True)
h = loops.fit(model, (X[:240], y[:240]), torch.nn.MSELoss(), opt, epochs=6,
              val=(X[240:], y[240:]), batch_size=8, metrics={"mae": "mae", "max": "max_error"},
              checkpoint=run, resume=True, save_every=0, scheduler=sched, seed=1,
              verbose=2 if mode == "sigint-write" else 0, on_epoch_end=hook,
              precision="fp16" if mode == "fp16" else None, accumulate=3 if mode == "fp16" else 1)
torch.save({"model": model.state_dict(), "history": h}, out)
print("done", flush=True)
"""


def child(run, out, mode="plain"):
    return subprocess.Popen([sys.executable, "-c", CHILD, run, out, mode], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"})


def wait_for(p, word):
    for line in p.stdout:
        if line.startswith(word):
            return True
    return False


def without_time(h):
    return {k: v for k, v in h.items() if k != "time"}


_REFERENCE, _THREADS, _BACKGROUND = {}, [], {}


def setUpModule():
    """Start CHILD's uninterrupted runs (plain and fp16) now, in the background: on two
    cores they run beside the tests that interrupt their twins, and this process takes one
    thread (two on one free core would spin)."""
    _THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)
    for mode in ("plain", "fp16"):
        d = tempfile.TemporaryDirectory()
        out, run = os.path.join(d.name, "ref.pt"), os.path.join(d.name, "run")
        _REFERENCE[mode] = dict(process=child(run, out, mode), out=out, run=run, dir=d)
    d = tempfile.TemporaryDirectory()  # and a test's sequence of children, in a thread
    pool = concurrent.futures.ThreadPoolExecutor(1)
    _BACKGROUND.update({"ctrl-c inside writes": pool.submit(ctrl_c_inside_writes, d.name),
                        "dir": d, "pool": pool})


def tearDownModule():
    if _THREADS:
        torch.set_num_threads(_THREADS.pop())
    if _BACKGROUND:
        _BACKGROUND["pool"].shutdown(wait=True)  # its children end on their own
        _BACKGROUND["dir"].cleanup()
        _BACKGROUND.clear()
    for ref in _REFERENCE.values():
        if ref["process"].poll() is None:  # not read by any test that ran: stopped
            ref["process"].kill()
        ref["process"].communicate()
        ref["dir"].cleanup()
    _REFERENCE.clear()


def reference_run(test, mode="plain"):
    """CHILD's result when never interrupted, run once for the tests that need it; its
    run directory is ``_REFERENCE[mode]["run"]`` until the module's tests end."""
    if not _REFERENCE:
        setUpModule()  # a test run without its module's set-up
    ref = _REFERENCE[mode]
    if "result" not in ref:
        _, err = ref["process"].communicate(timeout=300)
        test.assertEqual(ref["process"].returncode, 0, err)
        ref["result"] = torch.load(ref["out"], weights_only=True)
    return ref["result"]


def assert_same_run(test, got, ref, what=""):
    """CHILD's saved results equal bit for bit (the history but its time column, the weights)."""
    test.assertEqual(without_time(got["history"]), without_time(ref["history"]), what)
    for k, v in ref["model"].items():
        test.assertTrue(torch.equal(v, got["model"][k]), f"{what}: {k} differs")


class KillTest(Quiet):
    def test_kill_9_anywhere_then_resume_is_bit_identical(self):
        # Three kinds of trial, side by side: killed at a random moment, inside a checkpoint
        # write, and in fp16 with accumulation just after a snapshot; each resumed (the
        # random and fp16 ones killed once more) and resumed to the end.
        modes = {"random": "plain", "during-write": "slow-write", "fp16": "fp16"}

        def trial(kind, seed):
            rng = random.Random(seed)
            run = self.tmpdir()
            out, last, killed_at = os.path.join(self.tmpdir(), "out.pt"), None, []
            for _ in range(1 if kind == "during-write" else 2):
                p = child(run, out, modes[kind])
                self.assertTrue(wait_for(p, "started"))
                last = os.path.join(run, "last.pt")
                if kind == "fp16":
                    kill_after_a_new_snapshot(p, last)
                else:
                    if kind == "during-write":
                        self.assertTrue(wait_for(p, "writing"))
                    else:
                        time.sleep(rng.uniform(0.05, 0.6))
                    p.send_signal(signal.SIGKILL)
                p.wait(timeout=300)
                p.stdout.close(), p.stderr.close()
                if os.path.exists(last):  # always loadable: the previous complete file
                    ck = loops.load_checkpoint(last)
                    killed_at.append((kind, ck["epoch"], ck["step"]))
            if kind == "fp16":
                self.assertEqual(ck["step"] % 3, 0)  # snapshots fall between optimizer steps
                self.assertLess(ck["epoch"], 6)  # the kills landed before the end
            p = child(run, out, "fp16" if kind == "fp16" else "plain")
            self.assertEqual(p.wait(timeout=300), 0, p.stderr.read())
            p.stdout.close(), p.stderr.close()
            self.assertEqual([f for f in os.listdir(run) if f.endswith(".tmp")], [])
            return kind, torch.load(out, weights_only=True), killed_at

        with concurrent.futures.ThreadPoolExecutor(len(modes)) as pool:
            done = list(pool.map(trial, modes, range(1234, 1234 + len(modes))))
        for kind, got, _ in done:
            assert_same_run(self, got, reference_run(self, "fp16" if kind == "fp16"
                                                     else "plain"), kind)
        ck = loops.load_checkpoint(os.path.join(_REFERENCE["fp16"]["run"], "last.pt"))
        self.assertLess(ck["scaler"]["scale"], 65536.0)  # fp16 overflows were skipped: it matters
        # the kills did land inside epochs, so mid-epoch snapshots were resumed from
        killed_at = [k for _, _, each in done for k in each]
        self.assertTrue(any(step > 0 for _, _, step in killed_at), killed_at)


def ctrl_c_inside_writes(where):
    """CHILD Ctrl-C'd inside a checkpoint write, resumed and Ctrl-C'd inside another, then
    resumed to its end: [(returncode, stdout, stderr, (epoch, step) of last.pt)] for the
    two interruptions, and the last run's (returncode, stderr, result). Run in the
    background from the module's set-up (see setUpModule)."""
    run, out, seen = os.path.join(where, "run"), os.path.join(where, "out.pt"), []
    for skip in (15, 60):  # two moments inside writes; the second in the resumed run
        p = child(run, out, "sigint-write")
        for word in ["started"] + ["writing"] * skip:
            if not wait_for(p, word):
                break
        p.send_signal(signal.SIGINT)
        said, err = p.communicate(timeout=300)
        ck = loops.load_checkpoint(os.path.join(run, "last.pt"))
        seen.append((p.returncode, said, err, (ck["epoch"], ck["step"])))
    p = child(run, out)
    _, err = p.communicate(timeout=300)
    return seen, (p.returncode, err, torch.load(out, weights_only=True) if p.returncode == 0
                  else None)


class CtrlCDuringWriteTest(Quiet):
    def test_ctrl_c_inside_a_checkpoint_write_ends_as_any_ctrl_c(self):
        # torch's zip writer turned a KeyboardInterrupt raised inside it into RuntimeError
        seen, (rc, err, got) = _BACKGROUND["ctrl-c inside writes"].result(timeout=600)
        for code, said, err_i, held in seen:
            self.assertNotEqual(code, 0)
            self.assertIn("KeyboardInterrupt", err_i)
            self.assertNotIn("RuntimeError", err_i)
            holds = re.search(r"interrupted during epoch \d+: stopping after \d+ completed "
                              r"epochs; last.pt holds epoch (\d+)(?: \+ (\d+) steps)?", said)
            self.assertIsNotNone(holds, said)
            self.assertEqual(held, (int(holds[1]), int(holds[2] or 0)))
        self.assertEqual(rc, 0, err)
        assert_same_run(self, got, reference_run(self))


class HookKillTest(Quiet):
    def test_a_stop_asked_by_a_hook_killed_inside_it_is_kept(self):
        run, out = self.tmpdir(), os.path.join(self.tmpdir(), "out.pt")
        p = child(run, out, "hook")
        self.assertTrue(wait_for(p, "asleep"))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=300)
        p.stdout.close(), p.stderr.close()
        p = child(run, out, "hook")
        said, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        self.assertEqual(said.split(), ["started", "hook", "3", "done"])  # again, then stop
        got = torch.load(out, weights_only=True)["history"]
        self.assertEqual(without_time(got), {k: v[:3] for k, v in without_time(
            reference_run(self)["history"]).items()})


class ChildNet(torch.nn.Module):
    """CHILD's model, without its sleep."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


# A run on a DataLoader with two (forked) workers, slow enough to be killed in epoch 2.
LOADER_CHILD = r"""
import sys, time, torch, loops
from test_faults import Lin, loader
class Slow(Lin):
    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)
model = Slow()
loops.fit(model, loader(workers=2), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.01),
          epochs=50, checkpoint=sys.argv[1], resume=True, verbose=0,
          on_epoch_end=lambda epoch, logs: print(f"epoch {epoch} done", flush=True))
"""


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 1)

    def forward(self, x):
        return self.lin(x)


def loader(workers=0):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(96, 6, generator=g),
                                          torch.randn(96, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8, num_workers=workers)


class OneRunPerDirectoryTest(Quiet):
    def test_a_second_fit_on_a_directory_in_use_is_refused_and_a_kill_frees_it(self):
        run, out = self.tmpdir(), os.path.join(self.tmpdir(), "out.pt")
        p = child(run, out, "hold")
        self.addCleanup(p.kill)
        self.assertTrue(wait_for(p, "asleep"))  # in the hook of epoch 3, holding the lock
        X, y = torch.randn(64, 6), torch.randn(64, 1)
        model = ChildNet()  # the child's setup, so that nothing else would refuse it
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        with self.assertRaisesRegex(ValueError, rf"{re.escape(run)}.* is in use by another "
                                                rf"run \(pid {p.pid} on "):  # not adopted
            self.fit(model, (X, y), torch.nn.MSELoss(), opt, epochs=6, val=(X, y),
                     metrics={"mae": "mae", "max": "max_error"}, checkpoint=run, resume=True,
                     scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7))
        self.assertTrue(os.path.exists(os.path.join(run, ".lock")))
        p.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
        p.wait(timeout=300)
        p.stdout.close(), p.stderr.close()
        p = child(run, out)
        self.assertEqual(p.wait(timeout=120), 0, p.stderr.read())
        p.stdout.close(), p.stderr.close()
        assert_same_run(self, torch.load(out, weights_only=True), reference_run(self))
        self.assertEqual(sorted(os.listdir(run)), ["best.pt", "history.csv", "last.pt", "run.json"])

    def small_fit(self, d, epochs=1, **kw):
        X, y = regression_data(32)
        model = mlp(sigmoid=False)
        self.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.01),
                 epochs=epochs, batch_size=8, checkpoint=d, **kw)
        return model

    def test_a_lock_file_that_is_not_ours_is_refused_and_left_as_it_was(self):
        # A link planted at DIR/.lock had its target truncated and overwritten (or, dangling,
        # created outside DIR); a user's own .lock was deleted at the end; a directory or a
        # FIFO there gave raw errors.
        outside = self.tmpdir()
        victim = os.path.join(outside, "victim.txt")
        with open(victim, "w") as f:
            f.write("precious")
        cases = {"link": (lambda p: os.symlink(victim, p), "is a symbolic link"),
                 "dangling": (lambda p: os.symlink(os.path.join(outside, "new"), p),
                              "is a symbolic link"),
                 "directory": (os.mkdir, "is a directory"),
                 "fifo": (os.mkfifo, "is not a regular file"),
                 "yours": (lambda p: open(p, "w").write("my notes"),
                           "is not loops' lock file \\(it holds 'my notes'\\)")}
        for name, (plant, says) in cases.items():
            d = os.path.join(self.tmpdir(), "run")
            os.mkdir(d)
            plant(os.path.join(d, ".lock"))
            with self.assertRaisesRegex(ValueError, rf"{re.escape(d)}/.lock {says}"):
                self.small_fit(d)
            self.assertEqual(os.listdir(d), [".lock"], name)  # nothing written, nothing removed
        with open(victim) as f:
            self.assertEqual(f.read(), "precious")
        self.assertEqual(sorted(os.listdir(outside)), ["victim.txt"])
        with open(os.path.join(d, ".lock")) as f:
            self.assertEqual(f.read(), "my notes")
        for left in ("", "pid 4242 on somewhere\n"):  # a killed run's lock: taken, then removed
            d = os.path.join(self.tmpdir(), "run")
            os.mkdir(d)
            with open(os.path.join(d, ".lock"), "w") as f:
                f.write(left)
            self.small_fit(d)
            self.assertEqual(sorted(os.listdir(d)),
                             ["best.pt", "history.csv", "last.pt", "run.json"])

    def test_two_new_runs_started_together_never_train_over_each_other(self):
        # B passed the "already holds a run" check before A wrote last.pt, then took the lock
        # once A had finished, and trained from scratch over A's finished run.
        d = os.path.join(self.tmpdir(), "run")
        take, a = loops._DirLock.__init__, []

        def b_waits_while_a_runs_whole(lock, directory):
            if not a:  # B, between its check and its lock: A starts and runs to its end
                a.append(None)
                a[0] = self.small_fit(d, epochs=2)
            take(lock, directory)
        with mock.patch.object(loops._DirLock, "__init__", b_waits_while_a_runs_whole):
            with self.assertRaisesRegex(ValueError, "already holds a run"):
                self.small_fit(d, epochs=3)  # B
        ck = loops.load_checkpoint(os.path.join(d, "last.pt"))
        self.assertEqual(ck["epoch"], 2)  # A's, whole
        for k, v in a[0].state_dict().items():
            self.assertTrue(torch.equal(v, ck["model"][k]), k)
        self.assertEqual(sorted(os.listdir(d)), ["best.pt", "history.csv", "last.pt", "run.json"])

    def test_a_restart_right_after_a_kill_is_not_kept_out_by_dataloader_workers(self):
        # Forked DataLoader workers inherited the lock and outlived the killed parent by
        # seconds: a restart was refused "in use by another run (pid <dead pid>)".
        run = os.path.join(self.tmpdir(), "run")
        p = subprocess.Popen([sys.executable, "-c", LOADER_CHILD, run], cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"})
        self.addCleanup(lambda: p.poll() is None and p.kill())
        self.assertTrue(wait_for(p, "epoch 1 done"))
        workers, deadline = [], time.time() + 120
        while len(workers) < 2 and time.time() < deadline:  # epoch 2's workers
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                workers = [int(pid) for pid in f.read().split()]
        self.assertEqual(len(workers), 2)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=300)
        p.stdout.close(), p.stderr.close()
        os.kill(workers[0], 0)  # still alive (they notice a dead parent within 5 s)
        model = Lin()
        self.fit(model, loader(), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.01),
                 epochs=loops.load_checkpoint(os.path.join(run, "last.pt"))["epoch"] + 1,
                 checkpoint=run, resume=True)

    def test_the_clean_up_removes_only_the_temp_files_fit_makes(self):
        d = self.tmpdir()
        own = ["last.pt.0123456789ab.tmp", "best.pt.a1b2c3d4e5f6.tmp",
               "history.csv.00ff00ff00ff.tmp",
               "run.json.447b6e45bc42.tmp"]  # was left behind by a kill during its write
        users = ["best.weights.tmp", "history.notes.tmp", "last.pt.mine.tmp", "last.tmp",
                 "run.json.mine.tmp"]
        for name in own + users:
            with open(os.path.join(d, name), "w") as f:
                f.write("keep me")
        X, y = binary_data(40)
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                 epochs=1, checkpoint=d)
        self.assertEqual(sorted(os.listdir(d)), sorted(["best.pt", "history.csv", "last.pt",
                                                        "run.json", *users]))


def kill_after_a_new_snapshot(p, last):
    """SIGKILL ``p`` as soon as it has replaced ``last`` (progress, however fast the machine)."""
    def stamp():
        with contextlib.suppress(FileNotFoundError):
            return os.stat(last).st_mtime_ns, os.stat(last).st_ino
    before = stamp()
    while stamp() == before and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)


class NonFiniteWeightsTest(Quiet):
    def test_a_nan_gradient_with_a_finite_loss_never_reaches_a_checkpoint(self):
        X, y = regression_data(64)
        model = mlp(sigmoid=False)
        calls = [0]

        def loss_fn(out, yb):  # finite everywhere; its gradient is NaN at one step
            calls[0] += 1
            loss = torch.nn.functional.mse_loss(out, yb)
            if calls[0] == 8:  # the last batch of epoch 2: no later loss would show it
                z = -out.abs().mean() - 1
                loss = loss + torch.where(z > 0, z.sqrt(), torch.zeros_like(z))
            return loss
        d = self.tmpdir()
        with self.assertRaisesRegex(FloatingPointError, r"epoch 2: the weights hold NaN or inf "
                                    r"\(0\.weight.*although every loss was finite.*"
                                    r"\(last.pt holds epoch 1\)"):
            self.fit(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), 0.01),
                     epochs=3, batch_size=16, checkpoint=d, shuffle=False)
        for name in ("best.pt", "last.pt"):
            ck = loops.load_checkpoint(os.path.join(d, name))
            self.assertEqual(ck["epoch"], 1)
            self.assertTrue(all(torch.isfinite(v).all() for v in ck["model"].values()))
        with open(os.path.join(d, "history.csv")) as f:
            self.assertEqual(len(f.read().splitlines()), 2)  # header and epoch 1


    def test_fp16_skipping_every_step_says_so_then_stops(self):
        # a NaN gradient under a finite loss: GradScaler skips every step, the scale halves
        # each time (1 after 16 steps), and fp16 "completed" epochs without a word
        X, y = regression_data(64)
        model = mlp(sigmoid=False)
        before = copy.deepcopy(model.state_dict())

        def loss_fn(out, yb):
            z = -out.abs().mean() - 1  # < 0: sqrt is NaN there, its gradient too (where)
            return torch.nn.functional.mse_loss(out, yb) + torch.where(
                z > 0, z.sqrt(), torch.zeros_like(z))
        d = self.tmpdir()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with self.assertRaisesRegex(FloatingPointError, r"epoch 5: all 4 fp16 optimizer "
                                        r"steps were skipped \(gradients not finite; the loss "
                                        r"scale fell to 0\.0625\).*\(last.pt holds epoch 4\)"):
                self.fit(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), 0.01),
                         epochs=8, batch_size=16, checkpoint=d, precision="fp16")
        skipped = [str(w.message) for w in said if "steps were skipped" in str(w.message)]
        self.assertEqual(len(skipped), 4, skipped)  # epochs 1-4: scale 4096, 256, 16, 1
        self.assertIn("the loss scale fell to 4096", skipped[0])
        for k, v in before.items():  # no step was taken
            self.assertTrue(torch.equal(v, model.state_dict()[k]), k)
        # a run whose early steps overflow and later ones do not says nothing
        model = mlp(sigmoid=False)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            self.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.01),
                     epochs=2, batch_size=16, precision="fp16")
        self.assertFalse([w for w in said if "skipped" in str(w.message)])


class Interrupt(Exception):
    pass


def interrupting(model, at_call, exc=KeyboardInterrupt):
    """Make model's forward raise ``exc`` at its ``at_call``-th call (1-based)."""
    calls = [0]
    inner = model.forward

    def forward(x):
        calls[0] += 1
        if calls[0] == at_call:
            raise exc()
        return inner(x)
    model.forward = forward
    return model


def until_interrupted(call):
    """``call()``'s result, or the history a Ctrl-C (KeyboardInterrupt) carries out of fit."""
    try:
        return call()
    except KeyboardInterrupt as stop:
        return stop.history


class SnapshotTest(Quiet):
    def setUp(self):
        X, y = binary_data(200)
        self.train, self.val = (X[:160], y[:160]), (X[160:], y[160:])

    def run_fit(self, model, d, epochs=4, **kw):
        opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
        return self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=epochs, val=self.val,
                        batch_size=4, metrics={"acc": "binary_accuracy", "f1": "f1"},
                        checkpoint=d, resume=True, scheduler=sched, seed=3, **kw)

    def test_mid_epoch_snapshot_resumes_bit_identically(self):
        ref = mlp(dropout=0.3)
        h_ref = self.run_fit(ref, self.tmpdir())
        d = self.tmpdir()
        # 1 validation batch checked before training, then 40 training batches and 1
        # validation batch an epoch: the 25th step of epoch 3
        model = interrupting(mlp(dropout=0.3), at_call=1 + 41 * 2 + 25)
        with mock.patch.object(loops, "_TICK_SECONDS", 0.0):  # a snapshot at every tick
            h = until_interrupted(lambda: self.run_fit(model, d, save_every=0))
        self.assertEqual(len(h["loss"]), 2)
        ck = loops.load_checkpoint(os.path.join(d, "last.pt"))
        self.assertEqual((ck["epoch"], ck["step"]), (2, 24))  # the last batch boundary
        self.assertIn("numpy", ck["rng"])
        resumed = mlp(seed=9, dropout=0.3)
        h2 = self.run_fit(resumed, d, save_every=0)
        self.assertEqual(without_time(h2), without_time(h_ref))
        self.assertTrue(same_weights(resumed, ref))

    def test_resume_on_a_dataloader_mid_epoch(self):
        X, y = self.train
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8,
                                             shuffle=True)

        def go(model, d, **kw):
            opt = torch.optim.Adam(model.parameters(), 1e-2)
            return self.fit(model, loader, torch.nn.BCELoss(), opt, epochs=3, checkpoint=d,
                            resume=True, seed=5, **kw)
        ref = mlp(dropout=0.2)
        h_ref = go(ref, self.tmpdir())
        d = self.tmpdir()
        with mock.patch.object(loops, "_TICK_SECONDS", 0.0):
            until_interrupted(lambda: go(interrupting(mlp(dropout=0.2), at_call=20 + 7), d,
                                         save_every=0))
            resumed = mlp(dropout=0.2, seed=4)
            h = go(resumed, d, save_every=0)
        self.assertEqual(without_time(h), without_time(h_ref))
        self.assertTrue(same_weights(resumed, ref))

    def test_a_dataloaders_own_generator_resumes_where_it_was(self):
        # PyTorch's reproducibility recipe: the loader draws its order from its own generator
        X, y = self.train
        ds = torch.utils.data.TensorDataset(X, y)
        makers = {
            "DataLoader(shuffle=True, generator=g)": lambda: torch.utils.data.DataLoader(
                ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(42)),
            "RandomSampler(generator=g)": lambda: torch.utils.data.DataLoader(
                ds, batch_size=8, sampler=torch.utils.data.RandomSampler(
                    ds, generator=torch.Generator().manual_seed(42)))}

        def go(model, d, make, **kw):  # each call builds its loader afresh, as a program does
            opt = torch.optim.Adam(model.parameters(), 1e-2)
            return self.fit(model, make(), torch.nn.BCELoss(), opt, epochs=4, checkpoint=d,
                            resume=True, seed=5, **kw)
        for name, make in makers.items():
            ref = mlp(dropout=0.2)
            h_ref = go(ref, self.tmpdir(), make)
            for save_every in (None, 0):  # from the end of epoch 2, or from inside epoch 3
                with self.subTest(name, save_every=save_every), \
                        mock.patch.object(loops, "_TICK_SECONDS", 0.0):
                    d = self.tmpdir()
                    until_interrupted(lambda: go(interrupting(mlp(dropout=0.2), 2 * 20 + 7), d,
                                                 make, save_every=save_every))
                    resumed = mlp(dropout=0.2, seed=4)
                    h = go(resumed, d, make, save_every=save_every)
                    self.assertEqual(without_time(h), without_time(h_ref))
                    self.assertTrue(same_weights(resumed, ref))

    def test_persistent_workers_are_said_to_resume_inexactly(self):
        X, y = self.train
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8,
                                             num_workers=1, persistent_workers=True)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        with self.assertWarnsRegex(RuntimeWarning, "persistent_workers=True.*cannot go into "
                                                   "last.pt"):
            self.fit(model, loader, torch.nn.BCELoss(), opt, epochs=0, checkpoint=self.tmpdir())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # without a checkpoint there is nothing to resume
            self.fit(model, loader, torch.nn.BCELoss(), opt, epochs=0)

    def test_every_file_fit_writes_loads_with_weights_only(self):
        d = self.tmpdir()
        with mock.patch.object(loops, "_TICK_SECONDS", 0.0):
            until_interrupted(lambda: self.run_fit(interrupting(mlp(), at_call=50 + 25), d,
                                                   save_every=0))
        for name in ("best.pt", "last.pt"):
            ck = torch.load(os.path.join(d, name), weights_only=True)
            self.assertIn("model", ck)


class AtomicWriteTest(Quiet):
    def test_files_get_the_mode_the_umask_gives_any_new_file(self):
        X, y = binary_data(40)
        for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
            d = self.tmpdir()
            old = os.umask(umask)
            try:
                model = mlp()
                self.fit(model, (X, y), torch.nn.BCELoss(),
                         torch.optim.SGD(model.parameters(), 0.1), epochs=1, checkpoint=d)
                loops.save_checkpoint(os.path.join(d, "mine.pt"), model)
            finally:
                os.umask(old)
            for name in ("best.pt", "last.pt", "history.csv", "mine.pt"):
                self.assertEqual(oct(os.stat(os.path.join(d, name)).st_mode & 0o777), oct(mode),
                                 f"{name} under umask {oct(umask)}")

    def test_a_full_disk_inside_torch_save_raises_its_oserror(self):
        # torch's zip writer turns the file's OSError(ENOSPC) into a RuntimeError
        d = self.tmpdir()
        model = mlp(hidden=256)
        loops.save_checkpoint(os.path.join(d, "model.pt"), model)
        with open(os.path.join(d, "model.pt"), "rb") as f:
            before = f.read()
        written = [0]

        class Full(io.FileIO):
            def write(self, b):
                written[0] += len(b)
                if written[0] > 4000:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().write(b)
        with mock.patch.object(os, "fdopen", lambda fd, *a, **k: Full(fd, "wb")):
            with self.assertRaises(OSError) as err:
                loops.save_checkpoint(os.path.join(d, "model.pt"), mlp(hidden=256, seed=1))
        self.assertEqual(err.exception.errno, errno.ENOSPC)
        self.assertEqual(os.listdir(d), ["model.pt"])  # no temp file left
        with open(os.path.join(d, "model.pt"), "rb") as f:
            self.assertEqual(f.read(), before)

    def test_a_refused_resume_leaves_the_model_and_optimizer_untouched(self):
        X, y = binary_data(60)
        d = self.tmpdir()
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                 epochs=2, checkpoint=d)
        fresh = mlp(seed=4)
        opt = torch.optim.Adam(fresh.parameters())
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        for kw, says in ((dict(metrics={"acc": "binary_accuracy"}), "same metrics"),
                         (dict(epochs=1), "epochs=1 is the total")):
            with self.assertRaisesRegex(ValueError, says):
                self.fit(fresh, (X, y), torch.nn.BCELoss(), opt, checkpoint=d, resume=True,
                         **{"epochs": 3, **kw})
            self.assertTrue(all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items()))
            self.assertEqual(opt.state_dict()["state"], {})

    def test_a_resume_makes_history_csv_agree_with_last_pt(self):
        # killed after last.pt and before history.csv in the last epoch: the resume has
        # nothing to train, and still brings the CSV up to date
        X, y = binary_data(60)
        d = self.tmpdir()
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                 epochs=3, checkpoint=d)
        csv_path = os.path.join(d, "history.csv")
        with open(csv_path) as f:
            lines = f.read().splitlines()
        with open(csv_path, "w") as f:
            f.write("\n".join(lines[:-1]) + "\n")  # the CSV of epoch 2
        h = self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=3, checkpoint=d, resume=True)
        self.assertEqual(len(h["loss"]), 3)
        with open(csv_path) as f:
            self.assertEqual(f.read().splitlines(), lines)

    def test_a_write_that_fails_half_way_keeps_the_previous_files(self):
        X, y = binary_data(120)
        d = self.tmpdir()
        model = mlp()
        before = {}
        real_save = torch.save

        def full_disk(obj, f, *a, **k):
            f.write(b"x" * 100)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def on_epoch_end(epoch, logs):
            if epoch == 2:  # the files now hold epoch 2; the saves of epoch 3 will fail
                for name in ("best.pt", "last.pt"):
                    with open(os.path.join(d, name), "rb") as f:
                        before[name] = f.read()
                loops.torch.save = full_disk
        try:
            with self.assertRaises(OSError) as err:
                self.fit(model, (X, y), torch.nn.BCELoss(),
                         torch.optim.SGD(model.parameters(), 0.5), epochs=5, checkpoint=d,
                         on_epoch_end=on_epoch_end)
        finally:
            loops.torch.save = real_save
        self.assertEqual(err.exception.errno, errno.ENOSPC)
        for name, data in before.items():
            with open(os.path.join(d, name), "rb") as f:
                self.assertEqual(f.read(), data, name)
        self.assertEqual(loops.load_checkpoint(os.path.join(d, "last.pt"))["epoch"], 2)
        self.assertEqual(sorted(os.listdir(d)), ["best.pt", "history.csv", "last.pt", "run.json"])


class DamagedLastTest(Quiet):
    def test_a_damaged_or_foreign_last_pt_is_refused_before_anything_is_loaded(self):
        X, y = binary_data(60)
        d = self.tmpdir()
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                 epochs=2, checkpoint=d)
        path = os.path.join(d, "last.pt")
        with open(path, "rb") as f:
            good = f.read()
        ck = torch.load(path, weights_only=True)

        def changed(**kw):  # without the checksum: these are what a file that has none
            return {k: v for k, v in {**ck, **kw}.items()  # (an older one) is checked for
                    if v is not DROP and k != "checksum"}
        DROP = object()
        cases = {
            "zero bytes": (b"", "is not a plain checkpoint"),
            "cut short": (good[:len(good) // 2], "is not a plain checkpoint"),
            "no optimizer": (changed(optimizer=DROP), "'optimizer' is missing"),
            "no rng": (changed(rng=DROP), "'rng' is missing"),
            "string epoch": (changed(epoch="2"), "'epoch' is a str"),
            "bool epoch": (changed(epoch=True), "'epoch' is a bool"),
            "negative epoch": (changed(epoch=-3), "expected counts >= 0"),
            "unequal columns": (changed(history={**ck["history"],
                                                 "loss": ck["history"]["loss"][:1]}),
                                "columns of lengths"),
            "epochs of another run": (changed(epoch=3), "columns of lengths"),
            "text in history": (changed(history={**ck["history"], "loss": ["a", "b"]}),
                                "other than numbers"),
            "foreign optimizer": (changed(optimizer={"lr": 1}), "not an optimizer's"),
            "mid-epoch without its meter": (changed(step=3), "'meter' is missing"),
        }
        fresh = mlp(seed=4)
        opt = torch.optim.Adam(fresh.parameters())
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        for name, (content, says) in cases.items():
            with self.subTest(name):
                if isinstance(content, bytes):
                    with open(path, "wb") as f:
                        f.write(content)
                else:
                    torch.save(content, path)
                with open(os.path.join(d, "history.csv")) as f:
                    csv_before = f.read()
                with self.assertRaises(ValueError) as err:
                    self.fit(fresh, (X, y), torch.nn.BCELoss(), opt, epochs=3, checkpoint=d,
                             resume=True)
                self.assertIn(path, str(err.exception))
                self.assertIn(says, str(err.exception))
                self.assertTrue(all(torch.equal(v, fresh.state_dict()[k])
                                    for k, v in before.items()))
                self.assertEqual(opt.state_dict()["state"], {})
                with open(os.path.join(d, "history.csv")) as f:
                    self.assertEqual(f.read(), csv_before)  # nothing written either
        with open(path, "wb") as f:
            f.write(good)
        h = self.fit(fresh, (X, y), torch.nn.BCELoss(), opt, epochs=3, checkpoint=d, resume=True)
        self.assertEqual(h["epoch"], [1, 2, 3])  # the good file still resumes


    def test_damage_below_the_top_level_is_refused_before_anything_is_loaded(self):
        # Each raised a raw KeyError/RuntimeError/TypeError after the model and optimizer
        # were loaded and history.csv rewritten, or was accepted silently.
        X, y = binary_data(64)
        d = self.tmpdir()
        model = mlp()

        def stop_in_epoch_2(step, loss):  # after the snapshot of step 11 (epoch 2, batch 3)
            if step == 11:
                raise Interrupt
        with mock.patch.object(loops, "_TICK_SECONDS", 0), self.assertRaises(Interrupt):
            self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                     epochs=3, batch_size=8, checkpoint=d, save_every=0,
                     on_batch_end=stop_in_epoch_2, metrics={"acc": "binary_accuracy"})
        path = os.path.join(d, "last.pt")
        ck = torch.load(path, weights_only=True)
        self.assertEqual((ck["epoch"], ck["step"]), (1, 2))
        with open(path, "rb") as f:
            good = f.read()

        def changed(**kw):  # without the checksum: these are what a file that has none
            return {k: v for k, v in {**ck, **kw}.items() if k != "checksum"}  # is checked for
        rng, opt_state = ck["rng"], ck["optimizer"]
        first = next(iter(opt_state["state"]))
        cases = {
            "a random state missing": (changed(rng={k: v for k, v in rng.items()
                                                    if k != "python"}),
                                       "'rng' has no 'python' random state"),
            "a torch RNG state of the wrong size": (changed(rng={**rng, "torch":
                                                                 rng["torch"][:100]}),
                                                    "'rng' does not load as a random state"),
            "Adam's exp_avg of the wrong shape": (changed(optimizer={**opt_state, "state": {
                **opt_state["state"], first: {**opt_state["state"][first],
                                              "exp_avg": torch.zeros(3)}}}),
                "the optimizer's 'exp_avg' of parameter 0 has shape (3,)"),
            "an empty meter": (changed(meter={}), "the snapshot's meter has no 'loss_sum'"),
            "rng_epoch None": (changed(rng_epoch=None), "'rng_epoch' is a NoneType"),
            "step 999": (changed(step=999), "'step' is 999, not inside an epoch of 8 batches"),
            "losses for more steps": (changed(meter={**ck["meter"], "losses": torch.zeros(5)}),
                                      "the snapshot's meter holds 5 losses"),
            "best nan": (changed(best=float("nan")), "'best' is nan"),
            "stopped bogus": (changed(stopped="bogus"), "'stopped' is 'bogus'"),
        }
        fresh = mlp(seed=4)
        opt = torch.optim.Adam(fresh.parameters())
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with open(os.path.join(d, "history.csv")) as f:
            csv_before = f.read()
        for name, (content, says) in cases.items():
            with self.subTest(name):
                torch.save(content, path)
                with self.assertRaises(ValueError) as err:
                    self.fit(fresh, (X, y), torch.nn.BCELoss(), opt, epochs=3, batch_size=8,
                             checkpoint=d, resume=True, save_every=0,
                             metrics={"acc": "binary_accuracy"})
                self.assertIn(f"{path} is damaged: {says}", str(err.exception))
                self.assertTrue(all(torch.equal(v, fresh.state_dict()[k])
                                    for k, v in before.items()))
                self.assertEqual(opt.state_dict()["state"], {})
                with open(os.path.join(d, "history.csv")) as f:
                    self.assertEqual(f.read(), csv_before)
        with open(path, "wb") as f:
            f.write(good)
        h = self.fit(fresh, (X, y), torch.nn.BCELoss(), opt, epochs=3, batch_size=8,
                     checkpoint=d, resume=True, save_every=0, metrics={"acc": "binary_accuracy"})
        self.assertEqual(h["epoch"], [1, 2, 3])  # the good file still resumes


    def test_a_snapshot_at_an_epochs_last_batch_resumes(self):
        # save_every's look can come at the last batch; a kill before the epoch's end
        # leaves that snapshot, which must resume (it was refused as "not inside an epoch")
        X, y = binary_data(64)
        d = self.tmpdir()
        calls, armed = [], [True]

        def val_fn(model):  # runs after the epoch's last batch, before the epoch's files
            calls.append(1)
            if len(calls) == 2 and armed:
                raise Interrupt
            return {"one": 1.0}

        def run(model, **kw):
            return self.fit(model, (X, y), torch.nn.BCELoss(),
                            torch.optim.Adam(model.parameters()), epochs=3, batch_size=8,
                            seed=0, val_fn=val_fn, metrics={"acc": "binary_accuracy"}, **kw)
        with mock.patch.object(loops, "_TICK_SECONDS", 0), self.assertRaises(Interrupt):
            run(mlp(), checkpoint=d, save_every=0)
        ck = torch.load(os.path.join(d, "last.pt"), weights_only=True)
        self.assertEqual((ck["epoch"], ck["step"]), (1, 8))  # epoch 2's last batch
        resumed = mlp(seed=3)
        h = run(resumed, checkpoint=d, resume=True, save_every=0)
        armed.clear()  # the reference run goes through
        whole = mlp()
        want = run(whole)
        self.assertTrue(same_weights(resumed, whole))
        self.assertEqual({k: v for k, v in h.items() if k != "time"},
                         {k: v for k, v in want.items() if k != "time"})


class OtherSettingsTest(Quiet):
    def test_a_snapshot_resumed_with_other_settings_is_refused_and_an_epoch_end_says_so(self):
        # A snapshot (epoch 2, batch 2 of 8) resumed with batch_size=16 skipped 2 * 16 rows;
        # shuffle, the data's rows, accumulate and bf16 changed were accepted silently too.
        X, y = binary_data(64)
        d = self.tmpdir()
        model = mlp()

        def stop_in_epoch_2(step, loss):
            if step == 11:
                raise Interrupt
        with mock.patch.object(loops, "_TICK_SECONDS", 0), self.assertRaises(Interrupt):
            self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                     epochs=3, batch_size=8, checkpoint=d, save_every=0,
                     on_batch_end=stop_in_epoch_2)
        path = os.path.join(d, "last.pt")
        with open(path, "rb") as f:
            good = f.read()
        self.assertEqual(loops.load_checkpoint(path)["step"], 2)
        cases = {"batch_size": (dict(batch_size=16), "batch_size 16 (last.pt: 8)"),
                 "shuffle": (dict(shuffle=False), "shuffle False (last.pt: True)"),
                 "rows": (dict(data=(X[:48], y[:48])), "rows 48 (last.pt: 64)"),
                 "accumulate": (dict(accumulate=3), "accumulate 3 (last.pt: 1)"),
                 "precision": (dict(precision="bf16"), "precision 'bf16' (last.pt: None)")}
        fresh = mlp(seed=4)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        for name, (kw, says) in cases.items():
            with self.subTest(name):
                kw = {"batch_size": 8, **kw}
                opt = torch.optim.Adam(fresh.parameters())
                with self.assertRaisesRegex(ValueError, rf"{re.escape(path)} stopped inside "
                                            rf"epoch 2, at batch 2, and this run changes "
                                            rf".*{re.escape(says)}"):
                    self.fit(fresh, kw.pop("data", (X, y)), torch.nn.BCELoss(), opt, epochs=3,
                             checkpoint=d, resume=True, save_every=0, **kw)
                self.assertTrue(all(torch.equal(v, fresh.state_dict()[k])
                                    for k, v in before.items()))
                with open(path, "rb") as f:
                    self.assertEqual(f.read(), good)
        # at an epoch's end a new batch size can go on: said in one line
        d2 = self.tmpdir()
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                 epochs=1, batch_size=8, checkpoint=d2)
        model = mlp()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            h = loops.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                          epochs=2, batch_size=16, checkpoint=d2, resume=True, verbose=2)
        self.assertEqual(h["epoch"], [1, 2])
        self.assertIn("resuming after epoch 1 with batch_size 16 (last.pt: 8), batches 4 "
                      "(last.pt: 8): the epochs from here train so", out.getvalue())


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class SafeLoadTest(Quiet):
    def test_pickled_code_is_refused_and_never_runs(self):
        d = self.tmpdir()
        marker, path = os.path.join(d, "pwned"), os.path.join(d, "evil.pt")
        torch.save({"model": {}, "payload": Evil(marker)}, path)
        with self.assertRaisesRegex(ValueError, "not a plain checkpoint"):
            loops.load_checkpoint(path, mlp())
        self.assertFalse(os.path.exists(marker))

    def test_a_damaged_file_gets_a_clear_error(self):
        path = os.path.join(self.tmpdir(), "bad.pt")
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")
        with self.assertRaisesRegex(ValueError, "bad.pt"):
            loops.load_checkpoint(path)
        with self.assertRaisesRegex(FileNotFoundError, "no checkpoint"):
            loops.load_checkpoint(path + ".missing")


class ResumeMismatchTest(Quiet):
    def setUp(self):
        X, y = binary_data()
        self.data, self.dir = (X, y), self.tmpdir()
        model = mlp()
        self.fit(model, self.data, torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                 epochs=3, checkpoint=self.dir)

    def resume(self, model, opt, epochs=5):
        return self.fit(model, self.data, torch.nn.BCELoss(), opt, epochs=epochs,
                        checkpoint=self.dir, resume=True)

    def test_other_architecture(self):
        model = mlp(hidden=20)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with self.assertRaisesRegex(ValueError, "different model architecture.*hidden|20"):
            self.resume(model, torch.optim.Adam(model.parameters()))
        for k, v in model.state_dict().items():  # not half-loaded
            self.assertTrue(torch.equal(v, before[k]))

    def test_other_optimizer_type(self):
        model = mlp()
        with self.assertRaisesRegex(ValueError, "optimizer Adam.*SGD"):
            self.resume(model, torch.optim.SGD(model.parameters(), 0.1))

    def test_load_checkpoint_refuses_optimizer_state_of_other_shapes_before_loading(self):
        # torch would load an exp_avg of another shape and fail at the first step, the model
        # loaded already: refused first, as a resume refuses it.
        model, path = mlp(), os.path.join(self.tmpdir(), "one.pt")
        opt = torch.optim.Adam(model.parameters())
        model(self.data[0][:4]).sum().backward()
        opt.step()
        state = opt.state_dict()
        state["state"][0]["exp_avg"] = torch.zeros(3)
        opt.load_state_dict(state)  # torch takes it as it is
        loops.save_checkpoint(path, model, opt)
        fresh = mlp(seed=5)
        fresh_opt = torch.optim.Adam(fresh.parameters())
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with self.assertRaisesRegex(ValueError, rf"{re.escape(path)} is damaged: the optimizer's "
                                                r"'exp_avg' of parameter 0 has shape \(3,\)"):
            loops.load_checkpoint(path, fresh, fresh_opt)
        self.assertTrue(all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items()))
        self.assertEqual(fresh_opt.state_dict()["state"], {})

    def test_fewer_epochs_than_done(self):
        model = mlp()
        with self.assertRaisesRegex(ValueError, "already trained 3 epochs.*epochs >= 3"):
            self.resume(model, torch.optim.Adam(model.parameters()), epochs=2)

    def test_same_epochs_as_done_is_nothing_to_do(self):
        model = mlp()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            h = self.fit(model, self.data, torch.nn.BCELoss(),
                         torch.optim.Adam(model.parameters()), epochs=3,
                         checkpoint=self.dir, resume=True, verbose=2)
        self.assertEqual(len(h["loss"]), 3)
        self.assertIn("nothing to do", out.getvalue())

    def test_a_fresh_run_never_overwrites_a_saved_one(self):
        model = mlp()
        with self.assertRaisesRegex(ValueError, "already holds a run.*resume=True"):
            self.fit(model, self.data, torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                     epochs=3, checkpoint=self.dir)


class Blowup(torch.nn.Module):
    """Gives a non-finite output at one chosen call."""

    def __init__(self, at_call, value):
        super().__init__()
        self.inner, self.at_call, self.value, self.calls = mlp(), at_call, value, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * self.value if self.calls == self.at_call else out


class NonFiniteTest(Quiet):
    def check(self, value, word):
        X, y = binary_data(100)
        d = self.tmpdir()
        model = Blowup(at_call=2 * 10 + 6, value=value)  # epoch 3, step 6 (10 steps an epoch)
        loss = torch.nn.MSELoss()
        with self.assertRaises(FloatingPointError) as err:
            self.fit(model, (X, y), loss, torch.optim.SGD(model.parameters(), 0.1), epochs=5,
                     batch_size=10, checkpoint=d)
        msg = str(err.exception)
        self.assertRegex(msg, rf"epoch 3: loss is {word} at step 6\b")
        last = loops.load_checkpoint(os.path.join(d, "last.pt"))
        best = loops.load_checkpoint(os.path.join(d, "best.pt"))
        self.assertEqual(last["epoch"], 2)
        for ck in (last, best):
            self.assertTrue(all(torch.isfinite(v).all() for v in ck["model"].values()))

    def test_nan_loss(self):
        self.check(float("nan"), "nan")

    def test_inf_loss(self):
        self.check(float("inf"), "inf")


SIGINT_CHILD = r"""
import sys, time, torch, loops
torch.manual_seed(0)
X, y = torch.randn(200, 4), torch.randn(200, 1)
class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(4, 1)
    def forward(self, x):
        time.sleep(0.002); return self.lin(x)
for lr in (0.01, 0.001):  # a sweep: one Ctrl-C must end it, not only the running fit
    print("sweep lr", lr, flush=True)
    model = Slow()
    try:
        loops.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), lr),
                  epochs=1000, batch_size=4, checkpoint=f"{sys.argv[1]}/{lr}", verbose=2)
    except KeyboardInterrupt as stop:
        print("history of", len(stop.history["loss"]), "epochs", flush=True)
        raise
"""


class CtrlCTest(Quiet):
    def fit_interrupted(self, at_call, checkpoint=True):
        X, y = binary_data(100)
        d = self.tmpdir() if checkpoint else None
        model = interrupting(mlp(), at_call=at_call)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                h = loops.fit(model, (X, y), torch.nn.BCELoss(),
                              torch.optim.SGD(model.parameters(), 0.1), epochs=5, batch_size=8,
                              checkpoint=d, verbose=2)
            except KeyboardInterrupt as stop:
                h = stop
        return h, d, out.getvalue().splitlines()[-1]

    def test_in_a_program_fit_re_raises_with_the_completed_epochs_history(self):
        stop, d, last_line = self.fit_interrupted(at_call=2 * 13 + 5)  # in epoch 3
        self.assertIsInstance(stop, KeyboardInterrupt)
        self.assertEqual(len(stop.history["loss"]), 2)
        self.assertEqual(stop.history["epoch"], [1, 2])
        self.assertEqual(loops.load_checkpoint(os.path.join(d, "last.pt"))["epoch"], 2)
        self.assertEqual(last_line, "interrupted during epoch 3: stopping after 2 completed "
                                    "epochs; last.pt holds epoch 2")

    def test_at_an_interactive_prompt_fit_returns_the_history(self):
        sys.ps1 = ">>> "  # what the Python prompt (and so IPython) sets
        try:
            h, d, last_line = self.fit_interrupted(at_call=2 * 13 + 5)
        finally:
            del sys.ps1
        self.assertIsInstance(h, dict)
        self.assertEqual(len(h["loss"]), 2)
        self.assertEqual(last_line, "interrupted during epoch 3: returning the history of 2 "
                                    "completed epochs; last.pt holds epoch 2")

    def test_in_the_first_epoch_it_says_only_what_is_true(self):
        stop, d, last_line = self.fit_interrupted(at_call=3)
        self.assertEqual(stop.history["loss"], [])
        self.assertEqual(last_line, "interrupted during epoch 1: stopping after 0 completed "
                                    "epochs; nothing saved yet")
        self.assertFalse(os.path.exists(os.path.join(d, "last.pt")))
        _, _, last_line = self.fit_interrupted(at_call=3, checkpoint=False)
        self.assertEqual(last_line, "interrupted during epoch 1: stopping after 0 completed "
                                    "epochs; nothing is saved without checkpoint=")

    def test_one_real_sigint_ends_a_sweep_as_an_interrupted_program(self):
        d = self.tmpdir()
        p = subprocess.Popen([sys.executable, "-c", SIGINT_CHILD, d], cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": HERE, "PYTHONUNBUFFERED": "1"},
                             preexec_fn=ctrl_c_as_usual)
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("epoch 2/1000"):
                p.send_signal(signal.SIGINT)
                break
        rest, err = p.communicate(timeout=300)
        lines += rest.splitlines(keepends=True)
        self.assertEqual(p.returncode, -signal.SIGINT, err)  # as any interrupted program
        self.assertIn("KeyboardInterrupt", err)
        self.assertEqual([ln for ln in lines if ln.startswith("sweep")], ["sweep lr 0.01\n"])
        self.assertTrue(lines[-2].startswith("interrupted during epoch"), lines[-2:])
        done = int(lines[-1].split()[2])
        saved = loops.load_checkpoint(os.path.join(d, "0.01", "last.pt"))["epoch"]
        self.assertGreaterEqual(saved, 2)  # every announced epoch was saved
        self.assertIn(saved, (done - 1, done))  # at most the epoch being written is missing
        self.assertTrue(lines[-2].rstrip().endswith(f"last.pt holds epoch {saved}"), lines[-2])


class Untouchable(torch.nn.Module):
    """A model whose forward must never run."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.sigmoid(self.lin(x))


class FailFastTest(Quiet):
    def check(self, error, pattern, data=None, model=None, **kw):
        X, y = binary_data()
        model = model or Untouchable().to(DEVICE)
        ckpt = os.path.join(self.tmpdir(), "run")
        kw.setdefault("checkpoint", ckpt)
        kw.setdefault("epochs", 2)
        opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), 0.1)
        with self.assertRaisesRegex(error, pattern):
            self.fit(model, data if data is not None else (X, y), torch.nn.BCELoss(), opt, **kw)
        self.assertEqual(getattr(model, "calls", 0), 0, "forward ran before the error")
        self.assertFalse(os.path.exists(ckpt) and os.listdir(ckpt), "a file was written")

    def test_length_mismatch(self):
        X, y = binary_data()
        self.check(ValueError, r"same first dimension.*\(103, 8\).*\(90, 1\)", data=(X, y[:90]))

    def test_empty_dataset(self):
        X, y = binary_data()
        self.check(ValueError, "empty", data=(X[:0], y[:0]))
        self.check(ValueError, "empty", data=[])

    def test_val_is_checked_too(self):
        X, y = binary_data()
        self.check(ValueError, "val: .*same first dimension", val=(X, y[:5]))

    def test_batch_size(self):
        self.check(ValueError, "batch_size must be an int >= 1, got 0", batch_size=0)
        self.check(ValueError, "batch_size .* got 2.5", batch_size=2.5)

    def test_epochs(self):
        self.check(ValueError, "epochs must be an int >= 0, got -1", epochs=-1)

    def test_metrics(self):
        self.check(TypeError, r"metrics\['acc'\]", metrics={"acc": 42})
        self.check(ValueError, r"metrics\['acc'\]: unknown metric 'accuracyy'",
                   metrics={"acc": "accuracyy"})

    def test_monitor_and_mode(self):
        self.check(ValueError, "monitor='val_acc'.*val_ values need val=", monitor="val_acc",
                   metrics={"acc": "binary_accuracy"})
        self.check(ValueError, "mode must be 'auto', 'min' or 'max', got 'maximum'",
                   mode="maximum")

    def test_other_options(self):
        self.check(ValueError, "patience", patience=0)
        self.check(ValueError, "verbose", verbose=3)
        self.check(ValueError, "min_delta", min_delta=-1)
        self.check(ValueError, "scheduler_interval", scheduler_interval="batch")
        self.check(TypeError, "optimizer must be a torch.optim.Optimizer",
                   optimizer=object())
        self.check(ValueError, "resume=True .* need checkpoint=DIR", resume=True,
                   checkpoint=None)

    def test_checkpoint_dir_that_cannot_be_written(self):
        blocker = os.path.join(self.tmpdir(), "a_file")
        open(blocker, "w").close()
        self.check(ValueError, "checkpoint directory .*a_file/run.* cannot be written",
                   checkpoint=os.path.join(blocker, "run"))

    def test_model_on_another_device(self):
        model = Untouchable().to("meta")
        self.check(ValueError, "parameters are on meta but device='cpu'", model=model,
                   device="cpu")

    def test_arguments_that_used_to_get_through(self):
        other = torch.nn.Linear(8, 1)
        self.check(ValueError, "none of them the model's.*made for another model",
                   optimizer=torch.optim.SGD(other.parameters(), 0.1))
        self.check(ValueError, "min_delta must be a finite number >= 0, got nan",
                   min_delta=float("nan"))
        self.check(ValueError, "save_every must be a number of seconds >= 0 or None, got True",
                   save_every=True)
        self.check(TypeError, "shuffle must be True or False, got 'no'", shuffle="no")
        for seed in ("abc", 1.5, True, 2**70, -1):
            self.check(ValueError, rf"seed must be None or an int .*got {seed!r}", seed=seed)

    def test_flags_that_were_true_by_accident(self):
        # resume="no" is truthy and resumed; True passed as 1 for verbose and clip_grad_norm
        for name, value in (("resume", "no"), ("resume", 1), ("restore_best", "yes")):
            self.check(TypeError, rf"{name} must be True or False, got {value!r}",
                       **{name: value})
        self.check(ValueError, "clip_grad_norm must be a positive number or None, got True",
                   clip_grad_norm=True)
        self.check(ValueError, "verbose must be 0, 1 or 2, got True", verbose=True)
        self.check(ValueError, r"device='cpu:1': the CPU is one device, 'cpu'", device="cpu:1")
        for name, value in (("shuffle", 0), ("resume", None)):
            self.check(TypeError, rf"{name} must be True or False", **{name: value})

    def test_a_scheduler_last_pt_could_not_hold_is_refused_before_training(self):
        class Warmup(torch.optim.lr_scheduler.LambdaLR):  # keeps a function among its state
            def __init__(self, opt):
                self.rule = lambda e: min(1.0, (e + 1) / 5)
                super().__init__(opt, self.rule)
        model = Untouchable()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        self.check(TypeError, r"scheduler's state_dict\(\)\['rule'\] is a function.*"
                              "could not be resumed", model=model, optimizer=opt,
                   scheduler=Warmup(opt))
        X, y = binary_data()  # without a checkpoint there is nothing to hold it: it trains
        self.fit(model, (X, y), torch.nn.BCELoss(), opt, epochs=1, scheduler=Warmup(opt))

    def test_a_loss_fn_returning_a_number_is_named_at_the_first_step(self):
        X, y = binary_data()
        model = mlp()
        with self.assertRaisesRegex(TypeError, "loss_fn returned a float; expected a scalar "
                                               "tensor"):
            self.fit(model, (X, y), lambda out, yb: 0.5, torch.optim.SGD(model.parameters(), 0.1),
                     epochs=1)

    def test_dict_batches_are_named_not_unpacked_to_their_keys(self):
        X, y = binary_data()

        class Rows(torch.utils.data.Dataset):
            def __len__(self):
                return len(X)

            def __getitem__(self, i):
                return {"x": X[i], "y": y[i]}
        model = Untouchable()
        with self.assertRaisesRegex(TypeError, r"train: a batch is a dict with keys \['x', 'y'\]; "
                                               r"expected an \(inputs, targets\) pair. Pass "
                                               r"forward=, which reads a batch of any shape"):
            self.fit(model, torch.utils.data.DataLoader(Rows(), batch_size=8), torch.nn.BCELoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1)
        self.assertEqual(model.calls, 0)  # the model never saw the string "x"

    def test_validation_of_the_wrong_shape_fails_before_training(self):
        X, y = binary_data()
        model = Untouchable()
        d = os.path.join(self.tmpdir(), "run")
        with self.assertRaisesRegex(RuntimeError, "val: the first validation batch.*before "
                                                  "training.*failed"):
            self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=2, val=(X[:, :5], y), checkpoint=d)
        self.assertEqual(model.calls, 1)  # that one batch, and no training step
        self.assertFalse(os.path.exists(d))

    def test_a_nan_in_validation_data_is_named_as_validation(self):
        X, y = binary_data()
        Xv = X.clone()
        Xv[40] = float("nan")
        model = mlp()
        with self.assertRaises(FloatingPointError) as err:
            self.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=2, val=(Xv, y), val_batch_size=16)
        msg = str(err.exception)
        self.assertRegex(msg, r"^epoch 1: validation loss is nan at batch 3;")
        self.assertIn("Every training loss was finite and every weight is", msg)
        self.assertIn("nothing is saved without checkpoint=", msg)
        self.assertIn("validation data", msg)
        self.assertNotIn("learning rate", msg)

    def test_non_scalar_loss_is_named_at_the_first_step(self):
        X, y = binary_data()
        model = mlp()
        with self.assertRaisesRegex(ValueError, r"shape \(32, 1\); expected a scalar"):
            self.fit(model, (X, y), torch.nn.BCELoss(reduction="none"),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1)


class RoundFourTest(Quiet):
    """What an adversarial test found at the seams and on resume (issue 37)."""

    def test_best_pt_is_never_ahead_of_last_pt_after_a_crash_between_them(self):
        # best.pt was written before last.pt: a crash between the two left best.pt holding
        # epoch 3 and last.pt epoch 2; a resumed epoch 3 that did not improve (here val_fn
        # says so; a changed batch size or GPU nondeterminism would do it) kept that best.pt,
        # and restore_best loaded weights of no epoch in the history.
        X, y = binary_data(64)
        d = self.tmpdir()
        scores = iter([1.0, 2.0, 3.0])

        def val_fn(model):
            return {"score": next(scores, 0.0)}

        def run(epochs):
            model = mlp()
            return model, self.fit(model, (X, y), torch.nn.BCELoss(),
                                   torch.optim.Adam(model.parameters(), 1e-2), epochs=epochs,
                                   batch_size=16, checkpoint=d, resume=True, val_fn=val_fn,
                                   monitor="score", mode="max", restore_best=True, seed=0)
        real, written = loops.save_checkpoint, []

        def crash_between_the_epoch_3_files(path, model, optimizer=None, **state):
            if state.get("epoch") == 3:
                written.append(os.path.basename(path))
                if len(written) == 2:
                    raise Interrupt  # the second of epoch 3's files never comes
            return real(path, model, optimizer, **state)
        with mock.patch.object(loops, "save_checkpoint", crash_between_the_epoch_3_files), \
                self.assertRaises(Interrupt):
            run(3)
        model, h = run(4)  # the resumed epochs do not improve: epoch 3 stays the best
        best = loops.load_checkpoint(os.path.join(d, "best.pt"))
        self.assertEqual(best["epoch"], h["best_epoch"][-1])
        self.assertEqual(best["value"], h["score"][best["epoch"] - 1])
        self.assertTrue(all(torch.equal(v, best["model"][k])
                            for k, v in model.state_dict().items()))  # restore_best's weights

    def test_val_fn_names_that_are_taken_are_refused(self):
        # They overwrote the column silently; {"epoch": 123} even left a run that could not
        # be resumed ("damaged ... for epoch 123").
        X, y = binary_data(40)
        for name in ("val_loss", "loss", "acc", "epoch", "lr", "best_epoch", "d_loss"):
            with self.subTest(name):
                model = mlp()
                d = self.tmpdir()

                def step(model, batch, opt):
                    opt.zero_grad()
                    loss = torch.nn.functional.binary_cross_entropy(model(batch[0]), batch[1])
                    loss.backward()
                    opt.step()
                    return {"d_loss": loss}
                own = {"train_step": step} if name == "d_loss" else {}
                with self.assertRaisesRegex(ValueError, rf"val_fn returned '{name}', a name "
                                                        "the epoch's values have already"):
                    self.fit(model, (X, y), torch.nn.BCELoss(),
                             torch.optim.SGD(model.parameters(), 0.1), epochs=2, val=(X, y),
                             metrics={"acc": "binary_accuracy"}, checkpoint=d,
                             val_fn=lambda m: {name: 123.0}, **own)
                self.assertFalse(os.path.exists(os.path.join(d, "last.pt")))

    def test_a_resume_that_would_mix_two_quantities_in_a_column_is_refused(self):
        # mae -> rmse under one name, another loss, another validation set: all continued
        # silently, and the README said other metrics were refused.
        X, y = binary_data(60)

        def run(d, loss_fn=torch.nn.BCELoss(), metric="mae", val=(X[:30], y[:30]), **kw):
            model = mlp()
            return self.fit(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), 0.1),
                            epochs=kw.pop("epochs", 2), val=val, metrics={"m": metric},
                            checkpoint=d, resume=True, **kw)
        d = self.tmpdir()
        run(d)
        for change, says in ((dict(metric="rmse"), "m rmse \\(last.pt: mae\\)"),
                             (dict(metric=lambda p, y: (p - y).abs().mean()),
                              "m .*<lambda> \\(last.pt: mae\\)"),
                             (dict(loss_fn=torch.nn.MSELoss()),
                              "loss MSELoss \\(last.pt: BCELoss\\)"),
                             (dict(val=(X[:20], y[:20])), "val rows 20 \\(last.pt: 30\\)")):
            with self.subTest(says):
                with self.assertRaisesRegex(ValueError, "other values in its history's columns: "
                                                        + says):
                    run(d, epochs=3, **change)
        self.assertEqual(run(d, epochs=3)["epoch"], [1, 2, 3])  # the same setup goes on

    def test_a_dataloaders_batch_size_changed_inside_an_epoch_is_refused(self):
        # fit's unused batch_size=32 was recorded for a DataLoader: a resume with another
        # loader batch size (the same number of batches) skipped the wrong rows.
        X, y = binary_data(60)
        d = self.tmpdir()

        def loader(b):  # 60 rows in batches of 10 or of 11: 6 batches either way
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), b)

        def stop(step, loss):
            if step == 9:
                raise Interrupt
        with mock.patch.object(loops, "_TICK_SECONDS", 0), self.assertRaises(Interrupt):
            model = mlp()
            self.fit(model, loader(10), torch.nn.BCELoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=3, checkpoint=d,
                     save_every=0, on_batch_end=stop)
        self.assertEqual(loops.load_checkpoint(os.path.join(d, "last.pt"))["step"], 2)
        model = mlp()
        with self.assertRaisesRegex(ValueError, "stopped inside epoch 2, at batch 2, and this "
                                                "run changes batch_size 11 \\(last.pt: 10\\)"):
            self.fit(model, loader(11), torch.nn.BCELoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=3, checkpoint=d,
                     resume=True, save_every=0)

    def test_a_checkpoint_damaged_on_disk_is_refused_by_its_checksum(self):
        # 8 flipped bytes of a weight in last.pt resumed without complaint (the loss went to
        # 2.6e25): each file carries a checksum of what it holds, verified as it is read.
        X, y = binary_data(60)
        d = self.tmpdir()

        def run(model, **kw):
            return self.fit(model, (X, y), torch.nn.BCELoss(),
                            torch.optim.Adam(model.parameters(), 1e-2), epochs=3, batch_size=16,
                            checkpoint=d, **kw)
        model = mlp()
        run(model, resume=True)
        weight = model.state_dict()["0.weight"]
        for name in ("last.pt", "best.pt"):
            with self.subTest(name):
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    good = f.read()
                at = good.index(weight.numpy().tobytes())  # the weight's bytes, stored as is
                bad = bytearray(good)
                bad[at:at + 8] = bytes(b ^ 0xFF for b in bad[at:at + 8])
                with open(path, "wb") as f:
                    f.write(bad)
                fresh = mlp(seed=5)
                before = {k: v.clone() for k, v in fresh.state_dict().items()}
                with self.assertRaisesRegex(ValueError, f"{re.escape(path)} is damaged: what it "
                                                        "holds no longer matches the checksum"):
                    if name == "last.pt":
                        run(fresh, resume=True)
                    else:
                        loops.load_checkpoint(path, fresh)
                self.assertTrue(all(torch.equal(v, fresh.state_dict()[k])
                                    for k, v in before.items()))  # nothing was loaded
                with open(path, "wb") as f:
                    f.write(good)
                loops.load_checkpoint(path, fresh)  # the file as written loads


if __name__ == "__main__":
    unittest.main()
