"""Tests of datasets.py and of the recipes in examples/ (real subprocesses)."""
import concurrent.futures
import gzip
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch

import datasets
import loops
from test_loops import ctrl_c_as_usual

HERE = os.path.dirname(os.path.abspath(__file__))


def tmpdir(test):
    d = tempfile.TemporaryDirectory()
    test.addCleanup(d.cleanup)
    return d.name


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


class LinearTest(unittest.TestCase):
    def test_points_and_split(self):
        data = datasets.linear()
        (X, y), (Xt, yt) = data
        self.assertEqual((X.shape, Xt.shape, X.dtype, y.dtype),
                         ((40, 1), (10, 1), torch.float32, torch.float32))
        allX = torch.cat([X, Xt]).squeeze(1)
        self.assertTrue(torch.allclose(allX, torch.arange(50) * 0.02))
        self.assertTrue(torch.allclose(torch.cat([y, yt]).squeeze(1), 0.7 * allX + 0.3))


class PimaTest(unittest.TestCase):
    def test_synthetic_shapes_balance_and_seed(self):
        data = datasets.pima()
        (X, y), (Xt, yt) = data
        self.assertIn("synthetic stand-in", data.source)
        self.assertEqual((X.shape, Xt.shape, y.shape, yt.shape),
                         ((700, 8), (68, 8), (700, 1), (68, 1)))
        self.assertEqual((X.dtype, y.dtype), (torch.float32, torch.float32))
        self.assertEqual(set(torch.cat([y, yt]).unique().tolist()), {0.0, 1.0})
        self.assertTrue(0.28 < torch.cat([y, yt]).mean().item() < 0.42)
        (X2, _), _ = datasets.pima(seed=0)
        (X3, _), _ = datasets.pima(seed=1)
        self.assertTrue(torch.equal(X, X2))
        self.assertFalse(torch.equal(X, X3))

    def test_standardised_with_training_statistics_only(self):
        (X, _), (Xt, _) = datasets.pima()
        self.assertTrue(torch.allclose(X.mean(0), torch.zeros(8), atol=1e-5))
        self.assertTrue(torch.allclose(X.std(0, correction=0), torch.ones(8), atol=1e-5))
        raw, _ = datasets._synthetic_pima(0)
        mean, std = raw[:700].mean(0), raw[:700].std(0)
        self.assertTrue(np.allclose(Xt.numpy(), (raw[700:] - mean) / std, atol=1e-5))
        self.assertFalse(torch.allclose(Xt.mean(0), torch.zeros(8), atol=1e-2))  # not its own

    def test_reads_the_real_csv_in_order(self):
        rng = np.random.default_rng(0)
        raw = np.column_stack([rng.integers(0, 200, (720, 8)), rng.integers(0, 2, 720)])
        path = write(os.path.join(tmpdir(self), "pima.csv"),
                     "\n".join(",".join(str(v) for v in row) for row in raw) + "\n")
        data = datasets.pima(path)
        (X, y), (Xt, yt) = data
        self.assertEqual(data.source, path)
        self.assertEqual((X.shape, Xt.shape), ((700, 8), (20, 8)))
        feats = raw[:, :8].astype(np.float64)
        mean, std = feats[:700].mean(0), feats[:700].std(0)
        self.assertTrue(np.allclose(X.numpy(), (feats[:700] - mean) / std, atol=1e-5))
        self.assertTrue(np.allclose(Xt.numpy(), (feats[700:] - mean) / std, atol=1e-5))
        self.assertEqual(y.squeeze(1).tolist(), raw[:700, 8].astype(float).tolist())
        self.assertEqual(yt.squeeze(1).tolist(), raw[700:, 8].astype(float).tolist())


class HousingTest(unittest.TestCase):
    def test_synthetic_shapes_and_split(self):
        data = datasets.housing()
        (X, y), (Xt, yt) = data
        self.assertIn("synthetic stand-in", data.source)
        self.assertEqual((X.shape, Xt.shape, y.shape), ((14448, 8), (6192, 8), (14448, 1)))
        self.assertTrue(torch.allclose(X.mean(0), torch.zeros(8), atol=1e-4))
        self.assertTrue(0.15 <= y.min().item() and y.max().item() <= 5.0)
        (_, y2), _ = datasets.housing(seed=0)
        (_, y3), _ = datasets.housing(seed=1)
        self.assertTrue(torch.equal(y, y2))
        self.assertFalse(torch.equal(y, y3))

    def test_reads_a_csv_with_or_without_header(self):
        d = tmpdir(self)
        rng = np.random.default_rng(1)
        raw = np.round(rng.normal(size=(50, 9)), 4)
        body = "\n".join(",".join(repr(float(v)) for v in row) for row in raw) + "\n"
        plain = write(os.path.join(d, "plain.csv"), body)
        header = write(os.path.join(d, "header.csv"),
                       "MedInc,HouseAge,AveRooms,AveBedrms,Population,AveOccup,Latitude,"
                       "Longitude,MedHouseVal\n" + body)
        a, b = datasets.housing(plain, seed=3), datasets.housing(header, seed=3)
        for (Xa, ya), (Xb, yb) in zip(a, b):
            self.assertTrue(torch.equal(Xa, Xb) and torch.equal(ya, yb))
        order = np.random.default_rng(3).permutation(50)
        (_, y), (_, yt) = a
        self.assertTrue(np.allclose(y.squeeze(1).numpy(), raw[order[:35], 8]))
        self.assertTrue(np.allclose(yt.squeeze(1).numpy(), raw[order[35:], 8]))


class LoadCsvTest(unittest.TestCase):
    def setUp(self):
        self.d = tmpdir(self)

    def csv(self, name, text):
        return write(os.path.join(self.d, name), text)

    def test_target_column_and_header_detection(self):
        path = self.csv("t.csv", "a,b,c\n1,2,3\n4,5,6\n")
        X, y = datasets.load_csv(path, target=0)
        self.assertEqual(X.tolist(), [[2.0, 3.0], [5.0, 6.0]])
        self.assertEqual(y.tolist(), [[1.0], [4.0]])
        X, y = datasets.load_csv(self.csv("s.csv", "1;2\n3;4\n"), delimiter=";")
        self.assertEqual((X.tolist(), y.tolist()), ([[1.0], [3.0]], [[2.0], [4.0]]))

    def test_errors_name_file_line_and_column(self):
        bad = self.csv("bad.csv", "1,2,3\n4,5,6\n7,x,9\n")
        with self.assertRaisesRegex(ValueError, r"bad.csv, line 3, column 2: 'x' is not a num"):
            datasets.load_csv(bad)
        ragged = self.csv("ragged.csv", "1,2,3\n4,5,6\n7,8,9\n1,2\n")
        with self.assertRaisesRegex(ValueError, r"ragged.csv, line 4: 2 columns, expected 3"):
            datasets.load_csv(ragged)
        with self.assertRaisesRegex(ValueError, r"empty.csv: no data rows"):
            datasets.load_csv(self.csv("empty.csv", ""))
        with self.assertRaisesRegex(ValueError, r"head.csv: no data rows .*header"):
            datasets.load_csv(self.csv("head.csv", "a,b\n"))


class DigitsTest(unittest.TestCase):
    def test_shapes_range_splits_and_seed(self):
        data = datasets.digits(n=1000, seed=0)
        (X, y), (Xv, yv), (Xt, yt) = data
        self.assertEqual((X.shape, Xv.shape, Xt.shape),
                         ((800, 1, 28, 28), (100, 1, 28, 28), (100, 1, 28, 28)))
        self.assertEqual((X.dtype, y.dtype), (torch.float32, torch.int64))
        self.assertTrue(0 <= X.min().item() and X.max().item() <= 1)
        self.assertEqual(sorted(y.unique().tolist()), list(range(10)))
        (X2, y2), _, _ = datasets.digits(n=1000, seed=0)
        (X3, _), _, _ = datasets.digits(n=1000, seed=1)
        self.assertTrue(torch.equal(X, X2) and torch.equal(y, y2))
        self.assertFalse(torch.equal(X, X3))

    def test_a_small_mlp_learns_it_well_but_not_perfectly(self):
        train, val, test = datasets.digits(n=4000, seed=2)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 100),
                                    torch.nn.ReLU(), torch.nn.Linear(100, 10))
        loops.fit(model, train, torch.nn.CrossEntropyLoss(),
                  torch.optim.Adam(model.parameters(), 2e-3), epochs=8, batch_size=64,
                  verbose=0, seed=0)
        acc = loops.evaluate(model, test, metrics={"acc": "accuracy"})["acc"]
        self.assertGreater(acc, 0.6)   # chance is 0.1
        self.assertLess(acc, 0.97)     # not solved outright: mistakes worth looking at


class MnistTest(unittest.TestCase):
    def test_reads_idx_files_gzipped_or_not(self):
        rng = np.random.default_rng(0)
        for gz in (False, True):
            d = tmpdir(self)
            tr_x, tr_y = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
            te_x, te_y = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
            ext = ".gz" if gz else ""
            write_idx(os.path.join(d, "train-images-idx3-ubyte" + ext), tr_x, gz)
            write_idx(os.path.join(d, "train-labels-idx1-ubyte" + ext), tr_y, gz)
            write_idx(os.path.join(d, "t10k-images-idx3-ubyte" + ext), te_x, gz)
            write_idx(os.path.join(d, "t10k-labels-idx1-ubyte" + ext), te_y, gz)
            data = datasets.mnist(d)
            (X, y), (Xt, yt) = data
            self.assertEqual((X.shape, Xt.shape, X.dtype, y.dtype),
                             ((5, 1, 28, 28), (3, 1, 28, 28), torch.float32, torch.int64))
            self.assertTrue(np.allclose(X.squeeze(1).numpy(), tr_x / 255.0))
            self.assertTrue(np.allclose(Xt.squeeze(1).numpy(), te_x / 255.0))
            self.assertEqual((y.tolist(), yt.tolist()), (tr_y.tolist(), te_y.tolist()))

    def test_missing_and_bad_files(self):
        d = tmpdir(self)
        with self.assertRaisesRegex(FileNotFoundError, "train-images-idx3-ubyte"):
            datasets.mnist(d)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            write(os.path.join(d, name), "not idx")
        with self.assertRaisesRegex(ValueError, "bad magic number"):
            datasets.mnist(d)


def run_example(name, *args, timeout=120):
    with tempfile.TemporaryDirectory() as runs:
        p = subprocess.run([sys.executable, os.path.join(HERE, "examples", name), "--quick",
                            "--runs", runs, *args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
        files = sorted(os.listdir(os.path.join(runs, name[:-3]))) if p.returncode == 0 else []
    return p, files


_RUN_ALL = {}


def setUpModule():
    """Start ``./run_all.sh --quick`` now, in the background: on two cores it runs beside
    this module's other tests (each mostly one process importing torch) instead of after."""
    _RUN_ALL["threads"] = torch.get_num_threads()
    torch.set_num_threads(1)  # this process on the other core (two threads on one would spin)
    runs = tempfile.TemporaryDirectory()
    p = subprocess.Popen(["bash", os.path.join(HERE, "run_all.sh"), "--quick", "--runs",
                          runs.name], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # one core, not both
    _RUN_ALL.update(process=p, runs=runs)


def tearDownModule():
    torch.set_num_threads(_RUN_ALL.get("threads", torch.get_num_threads()))
    p = _RUN_ALL.get("process")
    if p is not None and p.poll() is None:  # not read by any test that ran: stopped
        os.killpg(p.pid, signal.SIGKILL)  # bash and the example it runs
    if p is not None:
        p.communicate()
        _RUN_ALL["runs"].cleanup()


def run_all_quick():
    """``./run_all.sh --quick --runs DIR``, the README's main job, run once for the suite:
    (exit code, whole stdout, {example: (its part of stdout, the files of its run)})."""
    if "rc" not in _RUN_ALL:
        if "process" not in _RUN_ALL:  # a test run without its module's set-up
            setUpModule()
        p, runs = _RUN_ALL["process"], _RUN_ALL["runs"].name
        out, err = p.communicate(timeout=600)
        parts = re.split(r"^== examples/(\S+\.py) --quick --runs \S+\n", out, flags=re.M)
        each = {}
        for name, text in zip(parts[1::2], parts[2::2]):
            d = os.path.join(runs, name[:-3])
            each[name] = (text, sorted(os.listdir(d)) if os.path.isdir(d) else [])
        _RUN_ALL.update(rc=p.returncode, out=out, err=err, each=each)
    return _RUN_ALL


def example(name, *args, runs, timeout=120, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "examples", name), "--runs", runs,
                           *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def digest(path):
    with open(path, "rb") as f:
        return f.read()


class RunsAreKeptTest(unittest.TestCase):
    """An example never deletes a run, and a Ctrl-C ends it as an interrupted program."""

    def test_a_second_run_gets_its_own_directory_and_nothing_is_deleted(self):
        ran = run_all_quick()  # the first run: ./run_all.sh --quick's, copied
        made = os.path.join(ran["runs"].name, "quickstart")
        self.assertTrue(os.path.isdir(made), ran["out"][-2000:] + ran["err"][-2000:])
        runs = tmpdir(self)
        first = os.path.join(runs, "quickstart")
        shutil.copytree(made, first)
        write(os.path.join(first, "notes.txt"), "my notes")  # a user's file beside the run
        before = {n: digest(os.path.join(first, n)) for n in os.listdir(first)}
        p = example("quickstart.py", "--quick", runs=runs)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("quickstart-2/", p.stdout)
        self.assertEqual({n: digest(os.path.join(first, n)) for n in os.listdir(first)}, before)
        self.assertEqual(sorted(os.listdir(os.path.join(runs, "quickstart-2"))),
                         ["best.pt", "history.csv", "last.pt", "run.json"])
        # --resume continues the newest run: nothing left to do there; and beside it (they
        # touch different directories), --name picks a directory exactly: one that holds a
        # run is refused without --resume
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            resumed = pool.submit(example, "quickstart.py", "--quick", "--resume", runs=runs)
            p = example("quickstart.py", "--quick", "--name", "quickstart", runs=runs)
            resumed = resumed.result()
        self.assertEqual(resumed.returncode, 0, resumed.stderr)
        self.assertIn("nothing to do: 5 epochs done", resumed.stdout)
        self.assertIn("quickstart-2/", resumed.stdout)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("already holds a run: continue it with --resume, or start another with "
                      "a new --name", p.stderr)
        self.assertEqual({n: digest(os.path.join(first, n)) for n in os.listdir(first)}, before)

    def test_ctrl_c_ends_an_example_cleanly_and_it_resumes(self):
        runs = tmpdir(self)
        cmd = [sys.executable, os.path.join(HERE, "examples", "quickstart.py"), "--runs", runs,
               "--epochs", "1000"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=ctrl_c_as_usual)
        for line in p.stdout:
            if line.startswith("epoch 2/1000"):
                p.send_signal(signal.SIGINT)
                break
        out, err = p.communicate(timeout=300)
        self.assertEqual(p.returncode, -signal.SIGINT, err)
        self.assertNotIn("Traceback", err)
        self.assertRegex(out, r"interrupted during epoch \d+: stopping after \d+ completed "
                              r"epochs; last.pt holds epoch \d+")
        saved = int(re.search(r"last.pt holds epoch (\d+)", out).group(1))
        again = err.strip().splitlines()[-1].split("continue with: ", 1)[1].split()
        self.assertEqual(again[-3:], ["--resume", "--name", "quickstart"])
        again[again.index("--epochs") + 1] = str(saved + 1)
        p = subprocess.run(again, capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(f"epoch {saved + 1}/{saved + 1}", p.stdout)

    @unittest.skipIf(__import__("torch").cuda.is_available(), "this torch has CUDA")
    def test_device_cuda_without_cuda_is_a_clear_error(self):
        p = example("quickstart.py", "--device", "cuda", runs=tmpdir(self))
        self.assertEqual(p.returncode, 2)
        self.assertIn("--device cuda: this torch", p.stderr)
        self.assertIn("sees no CUDA GPU", p.stderr)
        self.assertNotIn("Traceback", p.stderr)


class GanKillTest(unittest.TestCase):
    """A recipe that is not ./run_all.sh --quick's: its runs go beside that one, before
    RecipesTest waits for it (unittest runs classes in the order of their names, pytest in
    the file's order; the module's set-up started run_all)."""

    def test_gan_killed_with_9_resumes_to_the_weights_of_a_run_never_killed(self):
        runs = tmpdir(self)
        args = ("--epochs", "12", "--threads", "1")
        cmd = [sys.executable, os.path.join(HERE, "examples", "gan.py"), "--runs", runs, *args]
        # the run never killed, beside the one killed (two cores)
        ref = subprocess.Popen(cmd + ["--name", "ref"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: ref.poll() is None and ref.kill())
        p = subprocess.Popen(cmd + ["--name", "killed"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        last = os.path.join(runs, "killed", "last.pt")
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:  # kill inside epoch 3 or later
            if os.path.exists(last) and loops.load_checkpoint(last)["epoch"] >= 2:
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=300)
        p.stderr.close()
        self.assertLess(loops.load_checkpoint(last)["epoch"], 12)  # killed before its end
        again = example("gan.py", *args, "--name", "killed", "--resume", runs=runs)
        self.assertEqual(again.returncode, 0, again.stderr)
        _, err = ref.communicate(timeout=300)
        self.assertEqual(ref.returncode, 0, err)
        a, b = (loops.load_checkpoint(os.path.join(runs, n, "last.pt")) for n in ("ref",
                                                                                   "killed"))
        self.assertEqual(sorted(a["optimizer"]), ["D", "G"])
        for k, v in a["model"].items():
            self.assertTrue(torch.equal(v, b["model"][k]), k)
        for name in ("G", "D"):
            for i, state in a["optimizer"][name]["state"].items():
                self.assertTrue(torch.equal(state["exp_avg_sq"],
                                            b["optimizer"][name]["state"][i]["exp_avg_sq"]))
        drop = lambda h: {k: v for k, v in h.items() if k != "time"}  # noqa: E731
        self.assertEqual(drop(a["history"]), drop(b["history"]))


class RecipesTest(unittest.TestCase):
    """Each recipe with --quick in a subprocess: exit code, key lines, its run directory.
    Without arguments of its own, a recipe is checked on its part of ./run_all.sh --quick."""

    def test_run_all_runs_every_example(self):
        ran = run_all_quick()
        self.assertEqual(ran["rc"], 0, ran["out"][-2000:] + ran["err"][-2000:])
        self.assertNotIn("\r", ran["out"])
        scripts = sorted(f for f in os.listdir(os.path.join(HERE, "examples"))
                         if f.endswith(".py") and not f.startswith("_"))
        self.assertEqual(sorted(ran["each"]), scripts)
        self.assertTrue(ran["out"].rstrip().endswith("== all examples passed"))

    def check(self, name, *patterns, args=()):
        if args:
            p, files = run_example(name, *args)
            self.assertEqual(p.returncode, 0, p.stderr[-3000:])
            out = p.stdout
        else:
            ran = run_all_quick()
            self.assertIn(name, ran["each"], ran["out"][-2000:] + ran["err"][-2000:])
            out, files = ran["each"][name]
            self.assertNotIn(f"!! examples/{name} failed", out, ran["err"][-3000:])
        self.assertNotIn("\r", out)
        for pattern in patterns:
            self.assertRegex(out, pattern)
        self.assertEqual(files, ["best.pt", "history.csv", "last.pt", "run.json"])
        return out

    def test_linear(self):
        out = self.check("linear.py", r"data: y = 0.7 x \+ 0.3",
                         r"learned weight 0\.\d{4} \(true 0.7\), bias 0\.\d{4} \(true 0.3\)")
        w = float(out.split("learned weight ")[1].split()[0])
        w0 = float(out.split("before training: weight ")[1].split(",")[0])
        self.assertLess(abs(w - 0.7), abs(w0 - 0.7) / 2)  # well on its way in 100 epochs
        self.assertIn("after 100 epochs", out)  # --quick is quick here too

    def test_pima_with_the_real_file_format(self):
        self.check("pima.py", r"data: synthetic stand-in for the Pima", r"test accuracy \d+")
        rng = np.random.default_rng(0)
        raw = np.column_stack([rng.integers(0, 200, (768, 8)), rng.integers(0, 2, 768)])
        path = write(os.path.join(tmpdir(self), "pima-indians-diabetes.csv"),
                     "\n".join(",".join(map(str, row)) for row in raw) + "\n")
        self.check("pima.py", rf"data: {path};", r"test accuracy", args=("--data", path))

    def test_find_lr(self):
        out = self.check("find_lr.py", r"layer +type +output shape +params\n-+\n0 +Linear",
                         r"parameters: 221 \(221 trainable, 0 non-trainable\)",
                         r"LR range test \(smoothed loss\)", r"1e-05 +0\.0001",
                         r": suggested lr [\d.e-]+",
                         r"suggested learning rate [\d.e-]+ \(tried \d+ rates",
                         r"test accuracy [\d.]+% at lr")
        lr = float(out.split("suggested learning rate ")[1].split()[0])
        self.assertTrue(1e-5 <= lr <= 10)
        self.assertIn(f"at lr {lr:.3g}", out)  # trained with it

    def test_gan_with_its_own_step(self):
        out = self.check("gan.py", r"data: 512 points of 8 Gaussians on a ring \(synthetic\)",
                         r"epoch 4/4  d_loss \d\.\d{4}  g_loss \d\.\d{4}  on_mode",
                         r"generated \(o\) and real \(#\) points",
                         r"last epoch: \d+% of the generated points land on a real cluster")
        self.assertIn("last.pt with both optimizers", out)

    def test_housing(self):
        self.check("housing.py", r"data: synthetic stand-in for California housing",
                   r"test: RMSE \d\.\d{4} \(\$[\d,]+\), MAE \d\.\d{4}")

    def test_digits_synthetic_and_mnist_files(self):
        d = tmpdir(self)  # first: it runs while ./run_all.sh --quick still does
        rng = np.random.default_rng(0)
        write_idx(os.path.join(d, "train-images-idx3-ubyte.gz"),
                  rng.integers(0, 256, (120, 28, 28)), True)
        write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), rng.integers(0, 10, 120), True)
        write_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"),
                  rng.integers(0, 256, (30, 28, 28)), True)
        write_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), rng.integers(0, 10, 30), True)
        self.check("digits.py", rf"data: {d}; 100 train / 20 val / 30 test", args=("--data", d))
        self.check("digits.py", r"data: procedural digits", r"best epoch \d+ .*test accuracy",
                   r"confusion matrix \(rows: true", r"accuracy per class",
                   r"the mistakes it was surest of:\n\ntrue \d \(0\.\d\d\) +true",
                   r"outputs: PCA, axes explain", r"hidden layer \(100 units\): PCA",
                   r"hidden layer \(100 units\): t-SNE, perplexity \d+, KL \d",
                   r"first-layer weights", r"largest probability, epoch 1 \(mean",
                   r"noise the model takes for a 3 \(p = ")


if __name__ == "__main__":
    unittest.main()
