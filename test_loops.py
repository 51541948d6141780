"""Tests of loops.py: oracles (the hand-written loop, whole-set metrics), real subprocesses.

Run with ``python -m unittest``. ``LOOPS_TEST_DEVICE=cuda python -m unittest`` runs
the same suite on a GPU.
"""
import concurrent.futures
import contextlib
import copy
import csv
import fcntl
import io
import json
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import unittest
import warnings
import weakref
from unittest import mock

import torch

import loops

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = torch.device(os.environ.get("LOOPS_TEST_DEVICE", "cpu"))


def ctrl_c_as_usual():
    """preexec_fn for a child that a test sends Ctrl-C: SIGINT as by default, so that
    Python installs its KeyboardInterrupt (a shell's background job ignores SIGINT, and
    its children would inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_python(code, *, env=None, timeout=120, **kw):
    """Run a Python snippet in a fresh interpreter beside loops.py."""
    full_env = {**os.environ, "PYTHONPATH": HERE, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def mlp(n_in=8, n_out=1, hidden=16, sigmoid=True, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(n_in, hidden), torch.nn.ReLU()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(hidden, n_out))
    if sigmoid:
        layers.append(torch.nn.Sigmoid())
    return torch.nn.Sequential(*layers).to(DEVICE)


def binary_data(n=103, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    y = ((X[:, :1] + 0.5 * torch.randn(n, 1, generator=g)) > 0).float()
    return X.to(DEVICE), y.to(DEVICE)


def regression_data(n=97, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    y = X @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g) + 3.0
    return X.to(DEVICE), y.to(DEVICE)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hand_loop(model, batch_list, loss_fn, opt, epochs, *, clip=None, scheduler=None):
    """The tutorial loop, written out; returns the per-epoch sample-weighted mean loss."""
    means = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for xb, yb in batch_list:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(yb)
            count += len(yb)
        means.append(total / count)
    return means


def slices(X, y, b):
    return [(X[i:i + b], y[i:i + b]) for i in range(0, len(X), b)]


class Quiet(unittest.TestCase):
    """fit with verbose=0 unless a test asks otherwise."""

    def fit(self, *args, **kw):
        kw.setdefault("verbose", 0)
        return loops.fit(*args, **kw)

    def assertClose(self, a, b, rel=1e-12, msg=None):
        self.assertTrue(math.isclose(a, b, rel_tol=rel, abs_tol=rel), msg or f"{a} != {b}")

    def tmpdir(self):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        return d.name


# --- 1. the same numbers as a hand-written loop --------------------------------

class HandLoopTest(Quiet):
    def check(self, make_model, data, loss_fn, make_opt, b, epochs=4, as_list=False):
        X, y = data
        ref = make_model()
        ref_means = hand_loop(ref, slices(X, y, b), loss_fn, make_opt(ref), epochs)
        model = make_model()
        train = slices(X, y, b) if as_list else (X, y)
        h = self.fit(model, train, loss_fn, make_opt(model), epochs=epochs, batch_size=b,
                     shuffle=False)
        self.assertTrue(same_weights(model, ref), "fit left other weights than the hand loop")
        self.assertEqual(len(h["loss"]), epochs)
        for got, want in zip(h["loss"], ref_means):
            self.assertClose(got, want)

    def test_bce_classifier_on_tensors(self):
        self.check(mlp, binary_data(), torch.nn.BCELoss(),
                   lambda m: torch.optim.Adam(m.parameters(), 1e-2), b=10)

    def test_bce_classifier_on_a_list_of_batches(self):
        self.check(mlp, binary_data(), torch.nn.BCELoss(),
                   lambda m: torch.optim.Adam(m.parameters(), 1e-2), b=10, as_list=True)

    def test_mse_regressor_on_tensors(self):
        self.check(lambda: mlp(sigmoid=False), regression_data(), torch.nn.MSELoss(),
                   lambda m: torch.optim.SGD(m.parameters(), 1e-2, momentum=0.9), b=16)

    def test_mse_regressor_on_a_list_of_batches(self):
        self.check(lambda: mlp(sigmoid=False), regression_data(), torch.nn.MSELoss(),
                   lambda m: torch.optim.SGD(m.parameters(), 1e-2, momentum=0.9), b=16,
                   as_list=True)

    def test_dataloader_gives_the_same_run_as_tensors(self):
        X, y = binary_data()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=9)
        a, b = mlp(), mlp()
        ha = self.fit(a, (X, y), torch.nn.BCELoss(), torch.optim.Adam(a.parameters()),
                      epochs=2, batch_size=9, shuffle=False)
        hb = self.fit(b, loader, torch.nn.BCELoss(), torch.optim.Adam(b.parameters()), epochs=2)
        self.assertTrue(same_weights(a, b))
        self.assertEqual(ha["loss"], hb["loss"])

    def test_a_shuffling_dataloader_draws_what_it_draws_in_the_tutorial_loop(self):
        # fit takes nothing from torch's random state that the loop would not: no iter()
        # to probe the loader, no seed drawn for an order the loader draws itself
        X, y = binary_data()
        ds = torch.utils.data.TensorDataset(X, y)
        ref, model = mlp(dropout=0.3), mlp(dropout=0.3)
        torch.manual_seed(7)
        hand_loop(ref, torch.utils.data.DataLoader(ds, batch_size=9, shuffle=True),
                  torch.nn.BCELoss(), torch.optim.Adam(ref.parameters()), 3)
        torch.manual_seed(7)
        self.fit(model, torch.utils.data.DataLoader(ds, batch_size=9, shuffle=True),
                 torch.nn.BCELoss(), torch.optim.Adam(model.parameters()), epochs=3)
        self.assertTrue(same_weights(model, ref))

    def test_train_epoch_alone_with_progress_and_scheduler(self):
        X, y = binary_data()
        ref = mlp()
        want = hand_loop(ref, slices(X, y, 10), torch.nn.BCELoss(),
                         torch.optim.SGD(ref.parameters(), 0.1), 1)[0]
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        calls = []
        logs = loops.train_epoch(model, (X, y), torch.nn.BCELoss(), opt, batch_size=10,
                                 shuffle=False, scheduler=sched,
                                 progress=lambda step, steps, running: calls.append(
                                     (step, steps, sorted(running))))
        self.assertTrue(same_weights(model, ref))
        self.assertClose(logs["loss"], want)
        self.assertEqual(calls[0], (1, 11, ["loss"]))  # the first step is shown at once
        self.assertTrue(all(1 <= s <= 11 for s, _, _ in calls))
        self.assertEqual(opt.param_groups[0]["lr"], 0.05)  # stepped once, after the epoch

    def test_sum_reduced_loss_is_a_per_sample_mean(self):
        X, y = regression_data()
        model = mlp(sigmoid=False)
        logs = loops.evaluate(model, (X, y), torch.nn.MSELoss(reduction="sum"), batch_size=10)
        with torch.no_grad():
            want = ((model(X) - y) ** 2).sum().item() / len(X)
        self.assertClose(logs["loss"], want, rel=1e-5)


# --- 2. exact epoch metrics: batched equals whole-set --------------------------

def oracle(name, p, y):
    """Whole-set values written independently of loops (Python floats from lists)."""
    p, y = p.double().cpu(), y.double().cpu()
    if name == "accuracy":
        return (p.argmax(1) == y.long()).double().mean().item()
    pf, yf = p.reshape(-1).tolist(), y.reshape(-1).tolist()
    err = [a - b for a, b in zip(pf, yf)]
    tp = sum(a > 0.5 and b > 0.5 for a, b in zip(pf, yf))
    fp = sum(a > 0.5 and not b > 0.5 for a, b in zip(pf, yf))
    fn = sum(not a > 0.5 and b > 0.5 for a, b in zip(pf, yf))
    return {
        "binary_accuracy": sum((a > 0.5) == (b > 0.5) for a, b in zip(pf, yf)) / len(pf),
        "mse": sum(e * e for e in err) / len(err),
        "rmse": math.sqrt(sum(e * e for e in err) / len(err)),
        "mae": sum(abs(e) for e in err) / len(err),
        "mape": 100 * sum(abs(e) / max(abs(b), 1e-7) for e, b in zip(err, yf)) / len(err),
        "max_error": max(abs(e) for e in err),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    }[name]


class ExactMetricsTest(Quiet):
    """With lr=0 the model does not move, so the training epoch's value must equal the
    whole-set value too; batch size 7 leaves a short last batch."""

    def run_metrics(self, model, train, val, loss_fn, names, batch_size=7):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        h = self.fit(model, train, loss_fn, opt, epochs=1, val=val, batch_size=batch_size,
                     metrics={n: n for n in names})
        with torch.no_grad():
            model.eval()
            for prefix, (X, y) in (("", train), ("val_", val)):
                p = model(X)
                t = y.double() if y.is_floating_point() else y
                self.assertClose(h[prefix + "loss"][0], loss_fn(p.double(), t).item(), rel=1e-6)
                for n in names:
                    self.assertClose(h[prefix + n][0], oracle(n, p, y), rel=1e-6,
                                     msg=f"{prefix}{n}: {h[prefix + n][0]} vs {oracle(n, p, y)}")

    def test_binary_metrics(self):
        X, y = binary_data(100)
        self.run_metrics(mlp(), (X[:64], y[:64]), (X[64:], y[64:]), torch.nn.BCELoss(),
                         ["binary_accuracy", "precision", "recall", "f1"])

    def test_regression_metrics(self):
        X, y = regression_data(100)
        self.run_metrics(mlp(sigmoid=False), (X[:64], y[:64]), (X[64:], y[64:]),
                         torch.nn.MSELoss(), ["mse", "rmse", "mae", "mape", "max_error"])

    def test_multiclass_accuracy(self):
        g = torch.Generator().manual_seed(3)
        X = torch.randn(100, 8, generator=g).to(DEVICE)
        y = torch.randint(0, 4, (100,), generator=g).to(DEVICE)
        self.run_metrics(mlp(n_out=4, sigmoid=False), (X[:64], y[:64]), (X[64:], y[64:]),
                         torch.nn.CrossEntropyLoss(), ["accuracy"])

    def test_large_outputs_fold_early_and_the_values_stay_the_whole_sets(self):
        # Kept outputs of 1 KiB or more fold once they hold _PENDING bytes (memory: see
        # bench/README.md); smaller ones wait for _FOLD_STEPS steps. Either way, exact.
        folds, fold = [], loops._Meter._fold

        def counting(meter):
            folds.append((meter.evaluating, len(meter._losses)))
            fold(meter)
        g = torch.Generator().manual_seed(4)
        X = torch.randn(400, 8, generator=g).to(DEVICE)
        steps = loops._Meter._PENDING // (16 * 64 * 4) + 1  # 16 rows of 64 float32 logits
        for classes, expected in ((64, [steps] * (25 // steps)), (2, [])):  # 25 steps
            folds.clear()
            y = torch.randint(0, classes, (400,), generator=g).to(DEVICE)
            with mock.patch.object(loops._Meter, "_fold", counting):
                self.run_metrics(mlp(n_out=classes, sigmoid=False), (X[:400], y[:400]),
                                 (X[:32], y[:32]), torch.nn.CrossEntropyLoss(), ["accuracy"],
                                 batch_size=16)
            self.assertEqual([n for evaluating, n in folds if not evaluating], expected)

    def test_batches_of_varying_sequence_length(self):
        # Outputs that cannot be concatenated are summed batch by batch: the same value.
        g = torch.Generator().manual_seed(5)
        batches = [(torch.randn(4, t, 3, generator=g).to(DEVICE),
                    torch.randn(4, t, generator=g).to(DEVICE)) for t in (5, 2, 7, 5, 3)]
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 1).to(DEVICE)
        model = torch.nn.Sequential(lin, torch.nn.Flatten(-2))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        h = self.fit(model, batches, torch.nn.MSELoss(), opt, epochs=1, val=batches,
                     metrics={"mae": "mae", "max_error": "max_error"})
        with torch.no_grad():
            p = torch.cat([model(xb).reshape(-1) for xb, _ in batches])
        y = torch.cat([yb.reshape(-1) for _, yb in batches])
        for prefix in ("", "val_"):
            self.assertClose(h[prefix + "mae"][0], oracle("mae", p, y), rel=1e-6)
            self.assertClose(h[prefix + "max_error"][0], oracle("max_error", p, y), rel=1e-6)

    def test_public_metric_functions_match_the_oracle(self):
        X, y = regression_data(50)
        p = y + torch.randn_like(y)
        for n in ["mse", "rmse", "mae", "mape", "max_error"]:
            self.assertClose(getattr(loops, n)(p, y).item(), oracle(n, p, y), rel=1e-6)
        yb = (y > 3).float()
        pb = torch.sigmoid(p - 3)
        for n in ["binary_accuracy", "precision", "recall", "f1"]:
            self.assertClose(getattr(loops, n)(pb, yb).item(), oracle(n, pb, yb), rel=1e-9)

    def test_target_shape_n_does_not_broadcast_against_n_by_1(self):
        p = torch.tensor([[1.0], [2.0], [3.0]])
        self.assertEqual(loops.mae(p, torch.tensor([1.0, 2.0, 5.0])).item(), 2 / 3)

    def test_precision_with_no_positive_prediction_is_zero(self):
        self.assertEqual(loops.precision(torch.zeros(4, 1), torch.ones(4, 1)).item(), 0.0)

    def test_accuracy_on_one_column_says_use_binary_accuracy(self):
        with self.assertRaisesRegex(ValueError, "binary_accuracy"):
            loops.accuracy(torch.rand(5, 1), torch.ones(5, 1))

    def test_confusion_matrix_matches_a_hand_count(self):
        g = torch.Generator().manual_seed(4)
        scores = torch.randn(60, 3, generator=g)
        y = torch.randint(0, 3, (60,), generator=g)
        want = [[0] * 3 for _ in range(3)]
        for t, p in zip(y.tolist(), scores.argmax(1).tolist()):
            want[t][p] += 1
        self.assertEqual(loops.confusion_matrix(scores, y, 3).tolist(), want)
        self.assertEqual(loops.confusion_matrix(scores.argmax(1), y, 3).tolist(), want)
        probs, labels = torch.tensor([[0.9], [0.2], [0.7]]), torch.tensor([[1.0], [1.0], [0.0]])
        self.assertEqual(loops.confusion_matrix(probs, labels, 2).tolist(), [[0, 1], [1, 1]])

    def test_metrics_by_function_and_custom_function(self):
        X, y = binary_data(60)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)

        def mean_prob(p, t):
            return p.mean()
        h = self.fit(model, (X, y), torch.nn.BCELoss(), opt, epochs=1, batch_size=7,
                     metrics={"acc": loops.binary_accuracy, "mp": mean_prob})
        with torch.no_grad():
            p = model(X)
        self.assertClose(h["acc"][0], oracle("binary_accuracy", p, y))
        self.assertClose(h["mp"][0], p.double().mean().item(), rel=1e-6)

    def test_bad_metric_names_the_key(self):
        X, y = binary_data()
        model = mlp()
        with self.assertRaisesRegex(ValueError, "'acc'.*'acuracy'"):
            loops.evaluate(model, (X, y), metrics={"acc": "acuracy"})
        with self.assertRaisesRegex(TypeError, "'acc'"):
            loops.evaluate(model, (X, y), metrics={"acc": 3})


class Counting(torch.nn.Module):
    """A linear model that writes down (training, rows) of each forward call."""

    def __init__(self, n_out=1):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, n_out)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, len(x)))
        return self.lin(x)


def macro_oracle(name, scores, y):
    """scikit-learn's average="macro", zero_division=0, written out over Python lists: the
    classes are those present in the targets or the predictions."""
    pred, true = scores.argmax(1).tolist(), y.reshape(-1).tolist()
    per = []
    for c in sorted(set(pred) | set(true)):
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        fp = sum(p == c and t != c for p, t in zip(pred, true))
        fn = sum(p != c and t == c for p, t in zip(pred, true))
        per.append({"precision": tp / (tp + fp) if tp + fp else 0.0,
                    "recall": tp / (tp + fn) if tp + fn else 0.0,
                    "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0}[name])
    return sum(per) / len(per)


class TargetsAndOutputsTest(Quiet):
    """What the metrics read from the shapes of targets and outputs (the traps of
    (N, 1) labels, logits and class scores), each against an independent oracle."""

    def test_accuracy_reads_n_by_1_integer_labels_as_labels(self):
        p = torch.tensor([[.1, .9], [.8, .2], [.3, .7]])
        self.assertEqual(loops.accuracy(p, torch.tensor([[1], [0], [1]])).item(), 1.0)
        self.assertEqual(loops.accuracy(p, torch.tensor([1, 0, 0])).item(), 2 / 3)
        self.assertEqual(loops.accuracy(p, torch.tensor([[0., 1.], [1., 0.], [1., 0.]])).item(),
                         2 / 3)  # one-hot rows: their arg-max
        with self.assertRaisesRegex(ValueError, r"class indices of shape \(3,\)"):
            loops.accuracy(p, torch.tensor([1, 0]))
        g = torch.Generator().manual_seed(8)
        X, y = torch.randn(90, 8, generator=g).to(DEVICE), torch.randint(0, 3, (90, 1), generator=g)
        model = mlp(n_out=3, sigmoid=False)
        got = loops.evaluate(model, (X, y.to(DEVICE)), metrics={"acc": "accuracy"}, batch_size=7)
        with torch.no_grad():
            self.assertClose(got["acc"], oracle("accuracy", model(X), y.reshape(-1)))

    def test_bce_with_logits_models_are_read_as_logits_in_fit_evaluate_train_epoch(self):
        X, y = binary_data(120)
        names = ["binary_accuracy", "precision", "recall", "f1"]
        model = mlp(sigmoid=False)  # logits, as BCEWithLogitsLoss wants
        with torch.no_grad():
            model[-1].weight.mul_(0.2)  # logits in (0, 0.5): read as probabilities they
            model[-1].bias.fill_(0.25)  # would all be negatives
            probs = torch.sigmoid(model(X))
        want = {n: oracle(n, probs, y) for n in names}
        self.assertNotEqual(oracle("binary_accuracy", model(X).detach(), y),
                            want["binary_accuracy"])  # the case the bug hid in
        loss_fn = torch.nn.BCEWithLogitsLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        h = self.fit(model, (X, y), loss_fn, opt, epochs=1, val=(X, y), batch_size=7,
                     metrics={n: n for n in names})
        ev = loops.evaluate(model, (X, y), loss_fn, metrics={n: n for n in names})
        tr = loops.train_epoch(model, (X, y), loss_fn, opt, metrics={n: getattr(loops, n)
                                                                     for n in names})
        for n in names:
            for got in (h[n][0], h["val_" + n][0], ev[n], tr[n]):
                self.assertClose(got, want[n], rel=1e-9, msg=n)
            # the public functions: logits=True reads the same rows as the probabilities
            self.assertEqual(getattr(loops, n)(model(X).detach(), y, logits=True).item(),
                             getattr(loops, n)(probs, y).item())

    def test_precision_recall_f1_macro_on_class_scores(self):
        g = torch.Generator().manual_seed(6)
        X = torch.randn(150, 8, generator=g).to(DEVICE)
        y = torch.randint(0, 4, (150,), generator=g).to(DEVICE)
        names = ["precision", "recall", "f1"]
        model = mlp(n_out=4, sigmoid=False)
        h = self.fit(model, (X[:100], y[:100]), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), lr=0.0), epochs=1,
                     val=(X[100:], y[100:]), batch_size=7, metrics={n: n for n in names})
        with torch.no_grad():
            scores = model(X).cpu()
        for n in names:
            self.assertClose(h[n][0], macro_oracle(n, scores[:100], y[:100].cpu()), rel=1e-9)
            self.assertClose(h["val_" + n][0], macro_oracle(n, scores[100:], y[100:].cpu()),
                             rel=1e-9)
        # a class neither true nor predicted is left out; one only true counts 0 precision
        s = torch.tensor([[5., 0, 0, 0], [5., 0, 0, 0], [0, 5., 0, 0], [0, 5., 0, 0]])
        t = torch.tensor([0, 1, 1, 2])
        for n in names:
            self.assertClose(getattr(loops, n)(s, t).item(), macro_oracle(n, s, t), rel=1e-12)
        self.assertClose(loops.precision(s, t).item(), (0.5 + 0.5 + 0.0) / 3, rel=1e-12)
        try:
            from sklearn import metrics as skm
        except ImportError:
            return
        for n in names:
            want = getattr(skm, n + "_score")(t, s.argmax(1), average="macro", zero_division=0)
            self.assertClose(getattr(loops, n)(s, t).item(), want, rel=1e-12)

    def test_a_failing_metric_fails_at_the_first_batch_and_names_itself(self):
        X, y = binary_data(100)
        model = Counting().to(DEVICE)

        def wrong(p, t):  # a user's metric with a shape bug
            return (p.argmax(1) == t.reshape(-1, 1, 1)).float().mean(1)
        with self.assertRaisesRegex(ValueError, r"metric 'mine' failed on a batch \(outputs: "
                                    r"a tensor of shape \(8, 1\); targets: a tensor of shape "
                                    r"\(8, 1\)\).*expected a scalar"):
            self.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=1, batch_size=8, metrics={"mine": wrong})
        self.assertEqual(len(model.seen), 1)  # at the first batch, not at a fold 128 later

    def test_confusion_matrix_refuses_classes_out_of_range_and_thresholds_as_metrics(self):
        with self.assertRaisesRegex(ValueError, r"predicted class is outside 0\.\.1"):
            loops.confusion_matrix(torch.tensor([2, 1]), torch.tensor([0, 1]), 2)
        with self.assertRaisesRegex(ValueError, r"true class is outside 0\.\.2"):
            loops.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
        with self.assertRaisesRegex(ValueError, "fractional"):
            loops.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0.4, 2.0]), 3)
        g = torch.Generator().manual_seed(2)
        p, soft = torch.rand(40, 1, generator=g), torch.rand(40, 1, generator=g)  # soft targets
        tn, fp, fn, tp = loops.confusion_matrix(p, soft, 2).reshape(-1).tolist()
        self.assertClose((tp + tn) / 40, loops.binary_accuracy(p, soft).item())
        self.assertClose(tp / (tp + fp), loops.precision(p, soft).item())
        self.assertClose(tp / (tp + fn), loops.recall(p, soft).item())
        z = torch.randn(40, 1, generator=g)
        self.assertTrue(torch.equal(loops.confusion_matrix(z, soft, 2, logits=True),
                                    loops.confusion_matrix(torch.sigmoid(z), soft, 2)))


class WeightedLossTest(Quiet):
    """CrossEntropyLoss(weight=...) and ignore_index: torch averages a batch over its
    targets' weights, so the epoch value weights each batch by them: the whole set's."""

    def data(self):
        g = torch.Generator().manual_seed(11)
        X, y = torch.randn(150, 8, generator=g), torch.randint(0, 3, (150,), generator=g)
        y[:40:3] = -100
        y[70:80] = -100  # with batch size 1 or 7 some batches are all ignored
        return X.to(DEVICE), y.to(DEVICE)

    def test_epoch_loss_is_the_whole_set_loss_for_any_batch_size(self):
        X, y = self.data()
        model = mlp(n_out=3, sigmoid=False)
        w = torch.tensor([1.0, 2.5, 0.5], device=DEVICE)
        y1 = torch.where(y == -100, 1, y)  # class 1 is the ignored one here
        for loss_fn, y in ((torch.nn.CrossEntropyLoss(weight=w), y),
                           (torch.nn.CrossEntropyLoss(), y),
                           (torch.nn.CrossEntropyLoss(weight=w, ignore_index=1), y1)):
            with torch.no_grad():
                whole = loss_fn(model(X), y).item()
            for b in (1, 7, 50):
                got = loops.evaluate(model, (X, y), loss_fn, batch_size=b)["loss"]
                self.assertClose(got, whole, rel=1e-6, msg=f"batch {b}: {got} vs {whole}")
            h = self.fit(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), lr=0.0),
                         epochs=1, batch_size=10, shuffle=False)  # batch 8 is all ignored
            self.assertClose(h["loss"][0], whole, rel=1e-6)  # and training does not stop

    def test_nll_loss_with_weights_too(self):
        X, y = self.data()
        model = torch.nn.Sequential(mlp(n_out=3, sigmoid=False), torch.nn.LogSoftmax(1))
        loss_fn = torch.nn.NLLLoss(weight=torch.tensor([0.2, 1.0, 3.0], device=DEVICE))
        with torch.no_grad():
            whole = loss_fn(model(X), y).item()
        self.assertClose(loops.evaluate(model, (X, y), loss_fn, batch_size=7)["loss"], whole,
                         rel=1e-6)

    def test_rows_the_loss_ignores_count_in_no_metric(self):
        X, y = self.data()
        model = mlp(n_out=3, sigmoid=False)
        y1 = torch.where(y == -100, 1, y)  # class 1 is the ignored one here
        names = ["accuracy", "precision", "recall", "f1"]
        with torch.no_grad():
            scores = model(X).cpu()
        for loss_fn, t in ((torch.nn.CrossEntropyLoss(), y),
                           (torch.nn.CrossEntropyLoss(ignore_index=1), y1)):
            ignored = loss_fn.ignore_index
            keep = (t != ignored).cpu()
            want = {"accuracy": oracle("accuracy", scores[keep], t.cpu()[keep]),
                    **{n: macro_oracle(n, scores[keep], t.cpu()[keep]) for n in names[1:]}}
            h = self.fit(model, (X, t), loss_fn, torch.optim.SGD(model.parameters(), lr=0.0),
                         epochs=1, batch_size=7, val=(X, t), metrics={n: n for n in names})
            ev = loops.evaluate(model, (X, t), loss_fn, metrics={n: n for n in names},
                                batch_size=1)
            for n in names:
                for got in (h[n][0], h["val_" + n][0], ev[n],
                            getattr(loops, n)(scores, t.cpu(), ignore_index=ignored).item()):
                    self.assertClose(got, want[n], rel=1e-12, msg=f"{n}, ignoring {ignored}")
            cm = loops.confusion_matrix(scores, t.cpu(), 3, ignore_index=ignored)
            self.assertEqual(int(cm.sum()), int(keep.sum()))
            self.assertEqual(cm.trace().item() / cm.sum().item(), want["accuracy"])
        # counted as wrong before: the ignored rows are a fifth of the set here
        self.assertNotEqual(loops.accuracy(scores, y.cpu()).item(), want["accuracy"])
        with self.assertRaisesRegex(TypeError, "mse takes no ignore_index"):
            loops.mse(scores, y.cpu(), ignore_index=-100)
        try:
            from sklearn import metrics as skm
        except ImportError:
            return
        keep = (y != -100).cpu()
        t, pred = y.cpu()[keep], scores.argmax(1)[keep]
        self.assertEqual(loops.accuracy(scores, y.cpu(), ignore_index=-100).item(),
                         skm.accuracy_score(t, pred))
        for n in names[1:]:
            self.assertClose(getattr(loops, n)(scores, y.cpu(), ignore_index=-100).item(),
                             getattr(skm, n + "_score")(t, pred, average="macro",
                                                        zero_division=0), rel=1e-12)
        self.assertTrue(torch.equal(loops.confusion_matrix(scores, y.cpu(), 3, ignore_index=-100),
                                    torch.from_numpy(skm.confusion_matrix(t, pred))))


class DropLastTest(Quiet):
    def test_reproduces_the_tutorial_loop_bit_for_bit(self):
        X, y = binary_data(105)
        ref, model = mlp(), mlp()
        opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
        loss_fn = torch.nn.BCELoss()
        for _ in range(3):  # the training-loop tutorial: len(X) // batch_size batches
            for i in range(len(X) // 10):
                xb, yb = X[i * 10:i * 10 + 10], y[i * 10:i * 10 + 10]
                opt_ref.zero_grad()
                loss_fn(ref(xb), yb).backward()
                opt_ref.step()
        self.fit(model, (X, y), loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3),
                 epochs=3, batch_size=10, shuffle=False, drop_last=True)
        self.assertTrue(same_weights(model, ref))

    def test_shuffled_epochs_and_train_epoch_skip_the_short_batch(self):
        X, y = binary_data(105)
        model = Counting().to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.fit(model, (X, y), torch.nn.MSELoss(), opt, epochs=2, batch_size=10,
                 drop_last=True, val=(X, y), val_batch_size=105)
        train_calls = [n for training, n in model.seen if training]
        self.assertEqual(train_calls, [10] * 20)  # 10 full batches an epoch, 5 rows dropped
        model.seen.clear()
        loops.train_epoch(model, (X, y), torch.nn.MSELoss(), opt, batch_size=10, drop_last=True)
        self.assertEqual([n for _, n in model.seen], [10] * 10)

    def test_bad_uses_are_refused_before_any_step(self):
        X, y = binary_data(20)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
        with self.assertRaisesRegex(ValueError, r"DataLoader\(\.\.\., drop_last=True\)"):
            self.fit(model, loader, torch.nn.BCELoss(), opt, epochs=1, drop_last=True)
        with self.assertRaisesRegex(ValueError, "leaves no batch"):
            self.fit(model, (X, y), torch.nn.BCELoss(), opt, epochs=1, batch_size=32,
                     drop_last=True)
        with self.assertRaisesRegex(TypeError, "drop_last must be True or False"):
            self.fit(model, (X, y), torch.nn.BCELoss(), opt, epochs=1, drop_last="yes")


# --- mixed precision, accumulation, compiled models ---------------------------------------

class AccumulateTest(Quiet):
    def test_k_batches_of_b_follow_one_batch_of_k_times_b_with_a_short_last_group(self):
        X, y = regression_data(103)  # batches of 10: 10 full and 3 rows; groups 4, 4, 3
        for shuffle in (False, True):
            big, small = mlp(sigmoid=False), mlp(sigmoid=False)
            h_big = self.fit(big, (X, y), torch.nn.MSELoss(),
                             torch.optim.SGD(big.parameters(), 0.05), epochs=3, batch_size=40,
                             shuffle=shuffle, seed=2, val=(X, y), metrics={"mae": "mae"})
            h_small = self.fit(small, (X, y), torch.nn.MSELoss(),
                               torch.optim.SGD(small.parameters(), 0.05), epochs=3,
                               batch_size=10, accumulate=4, shuffle=shuffle, seed=2, val=(X, y),
                               metrics={"mae": "mae"})
            for a, b in zip(big.parameters(), small.parameters()):
                self.assertTrue(torch.allclose(a, b, atol=1e-6), (a - b).abs().max())
            for k in ("loss", "mae", "val_loss", "val_mae"):
                for a, b in zip(h_big[k], h_small[k]):
                    self.assertClose(a, b, rel=1e-6, msg=k)

    def test_a_sum_loss_and_drop_last_follow_the_big_batch_too(self):
        # reduction="sum": the group's sum is its batches' sums, unweighted (each was scaled
        # by its share: k times too small). drop_last drops the short last group, as the
        # big batch drops its short end: 103 rows, 10 x 4 -> 2 steps an epoch (not 3).
        X, y = regression_data(103)
        for loss_fn, drop_last in ((torch.nn.MSELoss(reduction="sum"), False),
                                   (torch.nn.MSELoss(), True)):
            big, small = mlp(sigmoid=False), mlp(sigmoid=False)
            steps = []
            h_big = self.fit(big, (X, y), loss_fn, torch.optim.SGD(big.parameters(), 0.002),
                             epochs=2, batch_size=40, seed=2, drop_last=drop_last)
            h_small = self.fit(small, (X, y), loss_fn,
                               torch.optim.SGD(small.parameters(), 0.002), epochs=2,
                               batch_size=10, accumulate=4, seed=2, drop_last=drop_last,
                               on_batch_end=lambda step, loss: steps.append(step))
            for a, b in zip(big.parameters(), small.parameters()):
                self.assertTrue(torch.allclose(a, b, atol=1e-5), (a - b).abs().max())
            for a, b in zip(h_big["loss"], h_small["loss"]):
                self.assertClose(a, b, rel=1e-5, msg=loss_fn.reduction)
            self.assertEqual(steps, [1, 2, 3, 4] if drop_last else [1, 2, 3, 4, 5, 6])
        with self.assertRaisesRegex(ValueError, r"drop_last=True with 30 rows and batch_size 10 "
                                                r"x accumulate 4 leaves no batch"):
            self.fit(small, (X[:30], y[:30]), loss_fn, torch.optim.SGD(small.parameters(), 0.1),
                     epochs=1, batch_size=10, accumulate=4, drop_last=True)

    def test_equals_a_hand_written_accumulation_loop_bit_for_bit(self):
        X, y = binary_data(103)
        ref, model = mlp(), mlp()
        opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
        sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=3, gamma=0.5)
        loss_fn = torch.nn.BCELoss()
        batch_list = slices(X, y, 8)  # 13 batches: groups of 3, 3, 3, 3, 1
        steps = 0
        for _ in range(2):
            for i in range(0, len(batch_list), 3):
                group = batch_list[i:i + 3]
                rows = sum(len(yb) for _, yb in group)
                opt_ref.zero_grad()
                for xb, yb in group:
                    loss = loss_fn(ref(xb), yb)
                    (loss * (len(yb) / rows) if len(group) > 1 else loss).backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                opt_ref.step()
                sched_ref.step()
                steps += 1
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        self.fit(model, (X, y), loss_fn, opt, epochs=2, batch_size=8, shuffle=False,
                 accumulate=3, clip_grad_norm=0.5, scheduler=sched, scheduler_interval="step")
        self.assertTrue(same_weights(model, ref))
        self.assertEqual(sched.last_epoch, steps)  # the scheduler counts optimizer steps: 10

    def test_an_edit_to_the_one_backward_reaches_plain_and_accumulated_steps(self):
        # An L2 penalty written into _Stepper._backward, the one place every kind of step
        # goes through: fit at batch 12 equals a hand loop with the same penalty bit for
        # bit, and fit at batch 4 x accumulate 3 follows it (one L2 term per step: the
        # shares of a group add up to one).
        X, y = regression_data(96)
        loss_fn, l2 = torch.nn.MSELoss(), 0.05

        def penalty(model):
            return l2 * sum(p.square().sum() for p in model.parameters())

        def backward_with_l2(self, model, batch, share=None):
            loss, y_pred, yb = self.seam(model, batch)
            loss = loss + penalty(model)
            (loss if share is None else loss * share).backward()
            return loss.detach(), y_pred.detach(), yb
        hand = mlp(sigmoid=False)
        opt = torch.optim.SGD(hand.parameters(), 0.05)
        for _ in range(2):
            for xb, yb in slices(X, y, 12):
                opt.zero_grad()
                (loss_fn(hand(xb), yb) + penalty(hand)).backward()
                opt.step()
        runs = {}
        for name, batch_size, accumulate, patched in (("plain", 12, 1, True),
                                                      ("accumulated", 4, 3, True),
                                                      ("unpatched", 4, 3, False)):
            model = mlp(sigmoid=False)
            with mock.patch.object(loops._Stepper, "_backward",
                                   backward_with_l2 if patched else loops._Stepper._backward):
                self.fit(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), 0.05),
                         epochs=2, batch_size=batch_size, accumulate=accumulate, shuffle=False)
            runs[name] = model
        self.assertTrue(same_weights(runs["plain"], hand))
        for a, b, c in zip(runs["accumulated"].parameters(), hand.parameters(),
                           runs["unpatched"].parameters()):
            self.assertTrue(torch.allclose(a, b, atol=1e-6), (a - b).abs().max())
            self.assertGreater((c - b).abs().max().item(), 1e-3)  # the edit did something

    def test_progress_counts_batches_and_the_history_stays_per_epoch(self):
        X, y = binary_data(100)
        model = mlp()
        seen = []
        with mock.patch.object(loops, "_TICK_SECONDS", 0.0):
            loops.train_epoch(model, (X, y), torch.nn.BCELoss(),
                              torch.optim.SGD(model.parameters(), 0.1), batch_size=10,
                              accumulate=4, progress=lambda s, n, logs: seen.append((s, n)))
        self.assertEqual({n for _, n in seen}, {10})  # batches, not optimizer steps
        self.assertEqual([s for s, _ in seen], [4, 8, 10])  # looked at between steps only
        h = self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=3, batch_size=10, accumulate=4)
        self.assertEqual(len(h["loss"]), 3)


class PrecisionTest(Quiet):
    def dtypes_seen(self, model):
        seen = []
        model[0].register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
        return seen

    def test_autocast_is_active_in_training_and_evaluation_with_fp32_weights(self):
        X, y = binary_data(64)
        for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            model = mlp()
            seen = self.dtypes_seen(model)
            h = self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                         epochs=2, val=(X, y), precision=precision,
                         metrics={"acc": "binary_accuracy", "f1": "f1"})
            self.assertEqual({d for _, d in seen}, {dtype})
            self.assertEqual({t for t, _ in seen}, {True, False})  # training and validation
            self.assertEqual({p.dtype for p in model.parameters()}, {torch.float32})
            self.assertTrue(all(math.isfinite(v) for k in h for v in h[k]))
            seen.clear()
            ev = loops.evaluate(model, (X, y), torch.nn.BCELoss(), precision=precision)
            out = loops.predict(model, X, precision=precision)
            self.assertEqual({d for _, d in seen}, {dtype})
            self.assertEqual(out.dtype, torch.float32)  # handed back in fp32
            with torch.no_grad():
                full = torch.nn.BCELoss()(model(X), y).item()
            self.assertClose(ev["loss"], full, rel=3e-2)  # close to fp32, not equal

    def test_epoch_values_stay_exact_under_autocast(self):
        # The sums are fp64 whatever the outputs' dtype: the epoch value is the whole
        # set's value over the same (bf16) outputs, for any batch size.
        X, y = regression_data(100)
        model = mlp(sigmoid=False)
        for b in (7, 100):
            with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                p = torch.cat([model(xb).float() for xb in X.split(b)])  # as fit batches them
            ev = loops.evaluate(model, (X, y), metrics={"mae": "mae", "rmse": "rmse"},
                                batch_size=b, precision="bf16")
            self.assertClose(ev["mae"], oracle("mae", p, y), rel=1e-6)  # as in fp32 (above)
            self.assertClose(ev["rmse"], oracle("rmse", p, y), rel=1e-6)

    def test_fp16_skipped_steps_are_not_a_nan_stop_but_a_nan_loss_is(self):
        X, y = regression_data(64)
        model = mlp(sigmoid=False)
        big = y * 300  # gradients that overflow fp16 at GradScaler's first scales
        with self.assertWarnsRegex(RuntimeWarning, "all 4 fp16 optimizer steps were skipped"):
            h = self.fit(model, (X, big), torch.nn.MSELoss(),  # said, and training goes on
                         torch.optim.SGD(model.parameters(), 1e-6), epochs=2, batch_size=16,
                         precision="fp16", checkpoint=self.tmpdir())
        self.assertEqual(len(h["loss"]), 2)
        self.assertTrue(all(math.isfinite(v) for v in h["loss"]))
        X_nan = X.clone()
        X_nan[20] = float("nan")
        model = mlp(sigmoid=False)
        with self.assertRaisesRegex(FloatingPointError, "loss is nan at step 2"):
            self.fit(model, (X_nan, y), torch.nn.MSELoss(),
                     torch.optim.SGD(model.parameters(), 0.01), epochs=1, batch_size=16,
                     precision="fp16", shuffle=False)

    def test_bad_precision_or_accumulate_fails_before_any_step(self):
        X, y = binary_data()
        for kw, says in ((dict(precision="fp8"), "precision must be None .* 'bf16' or 'fp16'"),
                         (dict(precision=True), "precision must be"),
                         (dict(accumulate=0), "accumulate must be an int >= 1"),
                         (dict(accumulate=2.0), "accumulate must be an int >= 1")):
            model = Counting().to(DEVICE)
            d = self.tmpdir()
            with self.assertRaisesRegex(ValueError, says):
                self.fit(model, (X, y), torch.nn.MSELoss(),
                         torch.optim.SGD(model.parameters(), 0.1), epochs=1, checkpoint=d, **kw)
            self.assertEqual(model.seen, [])
            self.assertEqual(os.listdir(d), [])
        with self.assertRaisesRegex(ValueError, "precision must be"):
            loops.evaluate(mlp(), (X, y), precision="half")

    def test_resume_with_another_precision_is_refused(self):
        X, y = binary_data()
        d = self.tmpdir()
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                 epochs=1, checkpoint=d, precision="fp16")
        with self.assertRaisesRegex(ValueError, "saved with precision='fp16'"):
            self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=2, checkpoint=d, resume=True)


class CompiledModelTest(Quiet):
    def test_a_compiled_model_trains_checkpoints_plain_weights_and_resumes(self):
        X, y = binary_data(80)
        plain = mlp()
        h_plain = self.fit(plain, (X, y), torch.nn.BCELoss(),
                           torch.optim.Adam(plain.parameters(), 1e-2), epochs=4, seed=0,
                           val=(X, y))
        d = self.tmpdir()
        compiled = torch.compile(mlp(), backend="eager")
        opt = torch.optim.Adam(compiled.parameters(), 1e-2)
        self.fit(compiled, (X, y), torch.nn.BCELoss(), opt, epochs=2, seed=0, val=(X, y),
                 checkpoint=d)
        saved = loops.load_checkpoint(os.path.join(d, "last.pt"))["model"]
        self.assertFalse(any(k.startswith("_orig_mod") for k in saved))
        fresh = mlp(seed=5)
        loops.load_checkpoint(os.path.join(d, "last.pt"), fresh)  # into a plain model
        self.assertTrue(same_weights(fresh, compiled._orig_mod))
        again = torch.compile(mlp(seed=7), backend="eager")
        h = self.fit(again, (X, y), torch.nn.BCELoss(), torch.optim.Adam(again.parameters(), 1e-2),
                     epochs=4, seed=0, val=(X, y), checkpoint=d, resume=True)
        self.assertTrue(same_weights(again._orig_mod, plain))
        self.assertEqual({k: v for k, v in h.items() if k != "time"},
                         {k: v for k, v in h_plain.items() if k != "time"})


class LrFindTest(Quiet):
    def setup(self):
        X, y = binary_data(200)
        model = Recorder().to(DEVICE)  # Dropout and BatchNorm: random state and buffers
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return X, y, model, opt

    def test_rates_rise_geometrically_within_the_range(self):
        X, y, model, opt = self.setup()
        r = loops.lr_find(model, (X, y), torch.nn.BCELoss(), opt, start_lr=1e-6, end_lr=1.0,
                          steps=25, batch_size=16)
        self.assertEqual(set(r), {"lr", "loss", "suggestion"})
        want = [1e-6 * (1.0 / 1e-6) ** (i / 24) for i in range(25)]
        for a, b in zip(r["lr"], want):
            self.assertClose(a, b, rel=1e-12)
        self.assertEqual(len(r["loss"]), len(r["lr"]))
        self.assertIn(r["suggestion"], r["lr"])  # one of the rates tried

    def test_a_flat_start_does_not_pull_the_suggestion_to_the_edge(self):
        import datasets
        (X, y), _ = datasets.linear()
        X, y, loss_fn = X.to(DEVICE), y.to(DEVICE), torch.nn.MSELoss()
        # seeds whose first batch's loss was the curve's lowest point (suggestion: start_lr)
        for batch_size, seed in ((8, 0), (8, 22), (10, 28), (16, 28), (8, 1)):
            torch.manual_seed(seed)
            model = torch.nn.Linear(1, 1).to(DEVICE)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            r = loops.lr_find(model, (X, y), loss_fn, opt, batch_size=batch_size)
            self.assertLess(r["lr"][0], r["suggestion"], msg=seed)
            self.assertLess(r["suggestion"], r["lr"][-1], msg=seed)
            before = loops.evaluate(model, (X, y), loss_fn)["loss"]
            opt.param_groups[0]["lr"] = r["suggestion"]
            self.fit(model, (X, y), loss_fn, opt, epochs=5, batch_size=batch_size)
            after = loops.evaluate(model, (X, y), loss_fn)["loss"]
            self.assertLess(after, 0.75 * before, msg=f"seed {seed} at {r['suggestion']:g}")

    def test_model_optimizer_and_random_state_are_left_as_found(self):
        X, y, model, opt = self.setup()
        loss_fn = torch.nn.BCELoss()
        self.fit(model, (X, y), loss_fn, opt, epochs=1, batch_size=16)  # Adam has state now
        model.eval()
        model.net[1].train()  # a mixed set of modes, kept module by module
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [p.grad.clone() for p in model.parameters()]
        modes = [m.training for m in model.modules()]
        opt_state = copy.deepcopy(opt.state_dict())
        rng = torch.get_rng_state()
        loops.lr_find(model, (X, y), loss_fn, opt, steps=30, batch_size=16)
        after = model.state_dict()
        self.assertTrue(all(torch.equal(before[k], after[k]) for k in before))  # and buffers
        self.assertTrue(all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters())))
        self.assertEqual([m.training for m in model.modules()], modes)
        self.assertEqual(opt.param_groups[0]["lr"], 1e-3)
        self.assertEqual(repr(opt.state_dict()), repr(opt_state))
        self.assertTrue(torch.equal(torch.get_rng_state(), rng))
        g = torch.Generator().manual_seed(42)  # a DataLoader's own generator is put back too
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                             batch_size=16, shuffle=True, generator=g)
        state = g.get_state()
        loops.lr_find(model, loader, loss_fn, opt, steps=30)
        self.assertTrue(torch.equal(g.get_state(), state))

    def test_a_learnable_loss_hidden_buffers_and_the_groups_themselves_are_left_too(self):
        # Missed before: a loss_fn's own parameter in the optimizer (0 -> 9.77), a buffer
        # registered with persistent=False (a counter 0 -> 30), param_groups replaced by
        # new dicts (an old reference read lr = end_lr) and a tensor lr swapped.
        class Counted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 1)
                self.register_buffer("calls", torch.zeros((), dtype=torch.long),
                                     persistent=False)

            def forward(self, x):
                self.calls += 1
                return torch.sigmoid(self.lin(x))

        class Tempered(torch.nn.Module):  # a loss with a learnable temperature
            def __init__(self):
                super().__init__()
                self.t = torch.nn.Parameter(torch.zeros(()))

            def forward(self, out, y):
                return torch.nn.functional.binary_cross_entropy(out, y) * self.t.exp() - self.t

        X, y = binary_data()
        model, loss_fn = Counted(), Tempered()
        lr = torch.tensor(1e-3)
        opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=lr)
        group, weight = opt.param_groups[0], model.lin.weight
        loops.lr_find(model, (X, y), loss_fn, opt, steps=30, batch_size=16)
        self.assertEqual(loss_fn.t.item(), 0.0)
        self.assertEqual(model.calls.item(), 0)
        self.assertIs(opt.param_groups[0], group)
        self.assertIs(group["lr"], lr)
        self.assertEqual(lr.item(), torch.tensor(1e-3).item())
        self.assertIs(model.lin.weight, weight)
        self.assertEqual(dict(opt.state), {})  # Adam had no state before: none after

    def test_a_fit_after_lr_find_is_the_fit_without_it(self):
        X, y, model, opt = self.setup()
        X2, y2, ref, ref_opt = self.setup()
        loss_fn = torch.nn.BCELoss()
        torch.manual_seed(3)
        loops.lr_find(model, (X, y), loss_fn, opt, steps=20, batch_size=16)
        h = self.fit(model, (X, y), loss_fn, opt, epochs=2, batch_size=16)  # seeded by torch
        torch.manual_seed(3)
        h_ref = self.fit(ref, (X2, y2), loss_fn, ref_opt, epochs=2, batch_size=16)
        self.assertTrue(same_weights(model, ref))
        self.assertEqual(h["loss"], h_ref["loss"])

    def test_it_stops_when_the_loss_diverges(self):
        X, y = regression_data(100)
        model = mlp(sigmoid=False)
        r = loops.lr_find(model, (X, y), torch.nn.MSELoss(),
                          torch.optim.SGD(model.parameters(), 0.1),
                          start_lr=1e-4, end_lr=100.0, steps=100, batch_size=10)
        self.assertLess(len(r["lr"]), 100)  # SGD at rates near 100 blows up long before
        self.assertLessEqual(max(r["loss"]), 4 * min(r["loss"]))
        self.assertTrue(all(math.isfinite(v) for v in r["loss"]))

    def test_suggestion_on_a_problem_whose_good_range_is_known(self):
        # y = 0.7 x + 0.3, x in [0, 1], a linear model, full-batch SGD: the Hessian of
        # the MSE has largest eigenvalue 2.54, so rates below 2 / 2.54 = 0.79 converge
        # and rates above diverge. The suggestion must be a rate that converges.
        X = torch.linspace(0, 1, 100, device=DEVICE).unsqueeze(1)
        y = 0.7 * X + 0.3
        torch.manual_seed(0)
        model = torch.nn.Linear(1, 1).to(DEVICE)
        r = loops.lr_find(model, (X, y), torch.nn.MSELoss(),
                          torch.optim.SGD(model.parameters(), 0.1),
                          start_lr=1e-6, end_lr=100.0, steps=120, batch_size=100)
        self.assertLess(r["lr"][-1], 100.0)  # it diverged before the end
        self.assertTrue(0.05 < r["suggestion"] < 0.79, r["suggestion"])
        h = self.fit(model, (X, y), torch.nn.MSELoss(),
                     torch.optim.SGD(model.parameters(), r["suggestion"]), epochs=40,
                     batch_size=100)
        self.assertLess(h["loss"][-1], 0.01 * h["loss"][0])

    def test_dataloader_precision_and_bad_arguments(self):
        X, y, model, opt = self.setup()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=50)
        r = loops.lr_find(model, loader, torch.nn.BCELoss(), opt, steps=12)  # 4 batches, cycled
        self.assertEqual(len(r["lr"]), 12)
        r = loops.lr_find(model, (X, y), torch.nn.BCELoss(), opt, steps=5, precision="bf16")
        self.assertEqual(len(r["lr"]), 5)
        for kw, says in ((dict(start_lr=0), "start_lr must be a positive number"),
                         (dict(end_lr=1e-8), r"end_lr \(1e-08\) must be above start_lr"),
                         (dict(steps=1), "steps must be an int >= 2"),
                         (dict(precision="int8"), "precision must be")):
            counting = Counting().to(DEVICE)
            with self.assertRaisesRegex(ValueError, says):
                loops.lr_find(counting, (X, y), torch.nn.MSELoss(),
                              torch.optim.SGD(counting.parameters(), 0.1), **kw)
            self.assertEqual(counting.seen, [])


# --- 3. modes and memory ------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Dropout + BatchNorm model that writes down the mode and grad state of each call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                       torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(16, 1), torch.nn.Sigmoid())
        self.calls, self.outputs = [], []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        out = self.net(x)
        self.outputs.append(weakref.ref(out))
        return out


class ModesTest(Quiet):
    def test_evaluate_and_predict_run_in_eval_mode_without_grad_and_restore_the_mode(self):
        X, y = binary_data()
        model = Recorder().to(DEVICE)
        for start_mode in (True, False):
            model.train(start_mode)
            bn = model.net[1].running_mean.clone()
            a = loops.evaluate(model, (X, y), torch.nn.BCELoss(), batch_size=10)
            b = loops.evaluate(model, (X, y), torch.nn.BCELoss(), batch_size=10)
            p1, p2 = loops.predict(model, X, batch_size=10), loops.predict(model, (X, y))
            self.assertEqual(model.training, start_mode)
            self.assertEqual(set(model.calls), {(False, False)})
            self.assertEqual(a, b)  # dropout off: repeatable
            self.assertTrue(torch.equal(bn, model.net[1].running_mean))  # BN stats untouched
            self.assertEqual(p1.device.type, "cpu")
            model.eval()
            with torch.no_grad():
                self.assertTrue(torch.allclose(p1, model(X).cpu(), atol=1e-6))
            self.assertTrue(torch.allclose(p1, p2, atol=1e-6))
            model.calls.clear()

    def test_predict_keeps_input_order_over_batches(self):
        model = torch.nn.Linear(1, 1).to(DEVICE)
        with torch.no_grad():
            model.weight.fill_(1.0)
            model.bias.zero_()
        X = torch.arange(23.0).unsqueeze(1).to(DEVICE)
        self.assertEqual(loops.predict(model, X, batch_size=4).squeeze(1).tolist(),
                         list(map(float, range(23))))
        batches = [(X[i:i + 5], None) for i in range(0, 23, 5)]
        self.assertEqual(loops.predict(model, batches).squeeze(1).tolist(),
                         list(map(float, range(23))))

    def test_training_runs_in_train_mode_with_grad(self):
        X, y = binary_data()
        model = Recorder().to(DEVICE)
        model.eval()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                 epochs=1, batch_size=10)
        self.assertEqual(set(model.calls), {(True, True)})

    def test_history_is_plain_floats_and_json(self):
        X, y = binary_data()
        model = mlp()
        h = self.fit(model, (X[:80], y[:80]), torch.nn.BCELoss(),
                     torch.optim.Adam(model.parameters()), epochs=2, val=(X[80:], y[80:]),
                     metrics={"acc": "binary_accuracy", "f1": "f1"})
        self.assertEqual(list(h), ["epoch", "loss", "acc", "f1", "val_loss", "val_acc",
                                   "val_f1", "lr", "time", "best_epoch"])
        self.assertTrue(all(type(v) is float for vs in h.values() for v in vs))
        self.assertEqual(json.loads(json.dumps(h)), h)
        self.assertEqual(h["epoch"], [1.0, 2.0])

    def test_no_autograd_graph_survives_a_step(self):
        X, y = binary_data()
        model = Recorder().to(DEVICE)
        alive = []

        def forward(x, inner=model.forward):
            alive.append(sum(r() is not None for r in model.outputs))
            return inner(x)
        model.forward = forward
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                 epochs=2, batch_size=10)
        self.assertEqual(len(alive), 22)
        self.assertEqual(max(alive), 0, "an output with its graph outlived its step")


# --- 4. inputs ------------------------------------------------------------------------

class InputsTest(Quiet):
    def test_outputs_and_targets_a_loss_would_broadcast_are_refused_naming_both(self):
        X, y = regression_data(64)
        flat = y.reshape(-1)  # (N,) targets for a model with (N, 1) outputs
        quiet = warnings.catch_warnings()  # torch's own broadcast warning comes first
        quiet.__enter__()
        self.addCleanup(quiet.__exit__, None, None, None)
        warnings.simplefilter("ignore", UserWarning)
        for loss_fn in (torch.nn.MSELoss(), torch.nn.L1Loss(), torch.nn.HuberLoss()):
            model = mlp(sigmoid=False)
            before = copy.deepcopy(model.state_dict())
            with self.assertRaisesRegex(ValueError, rf"val: the first validation batch.*"
                                        rf"{type(loss_fn).__name__} got outputs of shape "
                                        r"\(64, 1\) and targets of shape \(64,\)"):
                self.fit(model, (X, flat), loss_fn, torch.optim.SGD(model.parameters(), 0.1),
                         epochs=2, val=(X, flat), batch_size=16)
            self.assertTrue(all(torch.equal(v, before[k]) for k, v in model.state_dict().items()))
            with tempfile.TemporaryDirectory() as d:  # no validation: the first step says so
                with self.assertRaisesRegex(ValueError, r"got outputs of shape \(16, 1\) and "
                                                        r"targets of shape \(16,\)"):
                    self.fit(model, (X, flat), loss_fn, torch.optim.SGD(model.parameters(), 0.1),
                             epochs=2, batch_size=16, checkpoint=d)
                self.assertEqual(sorted(os.listdir(d)), [])
            with self.assertRaisesRegex(ValueError, "targets of shape"):
                loops.evaluate(model, (X, flat), loss_fn)
        # the same shapes train as before, and so do losses that read shapes themselves
        model = mlp(sigmoid=False)
        h = self.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.01),
                     epochs=1, val=(X, y))
        with torch.no_grad():
            self.assertClose(h["val_loss"][0], torch.nn.functional.mse_loss(model(X), y).item(),
                             rel=1e-6)

    def test_a_model_that_returns_a_tuple_is_pointed_to_forward(self):
        class TwoOut(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 3)

            def forward(self, x):
                return self.lin(x), x.mean()
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(40, 8, generator=g).to(DEVICE), torch.randint(0, 3, (40,), generator=g)
        model = TwoOut().to(DEVICE)
        says = r"the model returned a tuple of 2 \(Tensor, Tensor\); loops needs one tensor.*forward="
        with self.assertRaisesRegex(TypeError, says):
            self.fit(model, (X, y.to(DEVICE)), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1)
        with self.assertRaisesRegex(TypeError, says):
            loops.evaluate(model, (X, y.to(DEVICE)), torch.nn.CrossEntropyLoss())
        with self.assertRaisesRegex(TypeError, says):
            loops.predict(model, X)
        first = loops.predict(model, (X, y), forward=lambda m, b: (m(b[0])[0], b[1]))
        self.assertEqual(tuple(first.shape), (40, 3))

    def test_batchnorm_and_a_last_batch_of_one_row_are_refused_before_any_step(self):
        # torch's "Expected more than 1 value per channel", after a whole epoch's work
        X, y = binary_data(33)  # batches of 8: 4 and one row
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                    torch.nn.ReLU(), torch.nn.Linear(16, 1), torch.nn.Sigmoid())
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
        for data in ((X, y), loader):
            with self.assertRaisesRegex(ValueError, r"the last training batch would hold 1 row "
                                                    r"\(33 rows in batches of 8\), and "
                                                    r"BatchNorm1d cannot train on one row: pass "
                                                    r"drop_last=True"):
                self.fit(model, data, torch.nn.BCELoss(),
                         torch.optim.SGD(model.parameters(), 0.1), epochs=2, batch_size=8)
        self.assertEqual(calls, [])
        h = self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.1),
                     epochs=2, batch_size=8, drop_last=True)
        self.assertEqual(len(h["loss"]), 2)
        self.assertTrue(model.training)  # fit leaves the model in training mode (README)

    def test_channels_last_images_stay_channels_last_in_every_batch(self):
        # The shuffled gather returned NCHW: a spy saw NCHW in training, channels_last in
        # validation (conv nets on a GPU are slower in NCHW)
        g = torch.Generator().manual_seed(0)
        X = torch.randn(40, 3, 6, 6, generator=g).to(DEVICE, memory_format=torch.channels_last)
        y = torch.randint(0, 2, (40,), generator=g).to(DEVICE)
        seen = []
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                    torch.nn.Linear(64, 2)).to(DEVICE)
        model[0].register_forward_pre_hook(lambda m, args: seen.append(
            (m.training, args[0].is_contiguous(memory_format=torch.channels_last))))
        for shuffle in (True, False):
            self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1, batch_size=16,
                     val=(X, y), shuffle=shuffle)
        self.assertEqual({fmt for training, fmt in seen if training}, {True})
        self.assertEqual({fmt for training, fmt in seen if not training}, {True})

    def test_a_list_of_two_tensors_says_to_pass_a_tuple(self):
        X, y = binary_data()
        model = mlp()
        with self.assertRaisesRegex(TypeError, r"list of two tensors; pass the tensors as a "
                                    r"tuple \(X, y\)"):
            self.fit(model, [X, y], torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), .1),
                     epochs=1)

    @unittest.skipIf(torch.cuda.is_available(), "this torch has CUDA")
    def test_cuda_without_cuda_says_so(self):
        X, y = binary_data()
        model = mlp()
        with self.assertRaisesRegex(ValueError, r"device='cuda', but this torch sees no CUDA"):
            self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), .1),
                     epochs=1, device="cuda")

    def test_one_shot_iterator_is_refused_for_several_epochs(self):
        X, y = binary_data()
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        with self.assertRaisesRegex(TypeError, "list or a DataLoader"):
            self.fit(model, iter(slices(X, y, 10)), torch.nn.BCELoss(), opt, epochs=2)
        h = self.fit(model, iter(slices(X, y, 10)), torch.nn.BCELoss(), opt, epochs=1)
        self.assertEqual(len(h["loss"]), 1)

    def test_batches_slices_keeps_the_short_batch_and_shuffles_by_generator(self):
        X, y = torch.arange(10.0), torch.arange(10)
        sizes = [len(xb) for xb, _ in loops.batches(X, y, 4)]
        self.assertEqual(sizes, [4, 4, 2])
        self.assertEqual([len(xb) for xb, _ in loops.batches(X, y, 4, drop_last=True)], [4, 4])

        def order(seed):
            g = torch.Generator().manual_seed(seed)
            return torch.cat([xb for xb, _ in loops.batches(X, y, 4, shuffle=True, generator=g)])
        self.assertTrue(torch.equal(order(5), order(5)))
        self.assertFalse(torch.equal(order(5), order(6)))
        self.assertEqual(sorted(order(5).tolist()), list(map(float, range(10))))
        for xb, yb in loops.batches(X, y, 3, shuffle=True):
            self.assertTrue(torch.equal(xb, yb.float()))  # rows stay paired

    def test_tensor_data_is_moved_to_the_device_once_not_per_batch(self):
        X, y = binary_data(200)

        def count_moves(b):
            model = mlp()
            calls = []
            real = torch.Tensor.to

            def to(self, *a, **k):
                calls.append(1)
                return real(self, *a, **k)
            with mock.patch.object(torch.Tensor, "to", to):
                self.fit(model, (X, y), torch.nn.BCELoss(),
                         torch.optim.SGD(model.parameters(), 0.1), epochs=3, batch_size=b)
            return len(calls)
        self.assertEqual(count_moves(4), count_moves(100))

    def test_same_seed_same_run_with_shuffle_and_dropout(self):
        X, y = binary_data()

        def run(seed):
            model = mlp(dropout=0.3)
            h = self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.Adam(model.parameters()),
                         epochs=3, batch_size=8, seed=seed)
            h.pop("time")
            return h, model
        (h1, m1), (h2, m2), (h3, m3) = run(7), run(7), run(8)
        self.assertEqual(h1, h2)
        self.assertTrue(same_weights(m1, m2))
        self.assertNotEqual(h1["loss"], h3["loss"])
        self.assertFalse(same_weights(m1, m3))


# --- 5. checkpoints --------------------------------------------------------------------

class CheckpointTest(Quiet):
    def setUp(self):
        X, y = binary_data(160)
        self.train, self.val = (X[:120], y[:120]), (X[120:], y[120:])

    def test_best_last_and_history_csv(self):
        d = self.tmpdir()
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), 0.05)
        seen = []

        def after(epoch, logs):
            seen.append(torch.load(os.path.join(d, "best.pt"), weights_only=True)["epoch"]
                        if os.path.exists(os.path.join(d, "best.pt")) else None)
        with mock.patch("os.replace", wraps=os.replace) as replace:
            h = self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=6, val=self.val,
                         batch_size=16, checkpoint=d, metrics={"acc": "binary_accuracy"})
        # every file arrived by a rename from a temp file in the same directory
        for src, dst in (c.args for c in replace.call_args_list):
            self.assertEqual(os.path.dirname(src), os.path.dirname(dst))
            self.assertTrue(src.endswith(".tmp"))
        self.assertEqual(sorted(os.listdir(d)), ["best.pt", "history.csv", "last.pt", "run.json"])
        best = torch.load(os.path.join(d, "best.pt"), weights_only=True)
        last = torch.load(os.path.join(d, "last.pt"), weights_only=True)
        vl = h["val_loss"]
        self.assertEqual(best["epoch"], vl.index(min(vl)) + 1)
        self.assertEqual(best["value"], min(vl))
        # best_epoch: the epoch best.pt held after each epoch
        self.assertEqual(h["best_epoch"], [float(vl.index(min(vl[:i + 1])) + 1) for i in range(6)])
        self.assertEqual(last["epoch"], 6)
        self.assertEqual(last["history"], h)
        with open(os.path.join(d, "history.csv")) as f:
            rows = [line.strip().split(",") for line in f]
        self.assertEqual(rows[0], list(h))
        self.assertEqual(len(rows), 7)
        for i, row in enumerate(rows[1:]):
            self.assertEqual([float(v) for v in row], [h[k][i] for k in h])
        # reloading best.pt into a fresh model reproduces the best val loss exactly
        fresh = mlp(seed=99)
        loops.load_checkpoint(os.path.join(d, "best.pt"), fresh)
        again = loops.evaluate(fresh, self.val, torch.nn.BCELoss())  # the batch size fit used
        self.assertEqual(again["loss"], min(vl))

    def test_min_delta_counts_only_real_improvements_and_the_plot_marks_that_epoch(self):
        d = self.tmpdir()
        model = mlp()
        h = self.fit(model, self.train, torch.nn.BCELoss(),
                     torch.optim.Adam(model.parameters(), 0.05), epochs=4, val=self.val,
                     checkpoint=d, min_delta=1e9)
        self.assertEqual(torch.load(os.path.join(d, "best.pt"), weights_only=True)["epoch"], 1)
        self.assertNotEqual(h["val_loss"].index(min(h["val_loss"])), 0)  # a lower one came later
        self.assertEqual(h["best_epoch"], [1.0] * 4)
        import plots_ascii  # beside loops.py
        with open(os.path.join(d, "history.csv")) as f:
            rows = list(csv.reader(f))
        written = {k: [float(r[i]) for r in rows[1:]] for i, k in enumerate(rows[0])}
        for history in (h, written):
            charts = plots_ascii.plot_history(history).split("\n\n")
            self.assertTrue(all(": best.pt holds epoch 1 " in c for c in charts), charts[0])

    def test_a_resume_says_where_it_goes_on_which_rate_it_uses_and_how_to_go_further(self):
        X, y = regression_data(64)

        def run(d, epochs, lr=0.05, **kw):
            model = mlp(sigmoid=False)
            opt = torch.optim.SGD(model.parameters(), lr)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                h = loops.fit(model, (X, y), torch.nn.MSELoss(), opt, epochs=epochs,
                              checkpoint=d, resume=True, verbose=2, batch_size=16, **kw)
            return out.getvalue(), h, model, opt
        with tempfile.TemporaryDirectory() as d:
            run(d, 2)
            said, h, _, opt = run(d, 4, lr=0.01)
            lines = said.splitlines()
            self.assertEqual(lines[0], f"resuming {d} at epoch 3 of 4 from last.pt")
            self.assertEqual(lines[1], "the optimizer was given lr 0.01; last.pt's 0.05 is "
                                       "used, so that the run goes on as it was")
            self.assertEqual(opt.param_groups[0]["lr"], 0.05)
            self.assertEqual(h["lr"], [0.05] * 4)
            said, _, _, _ = run(d, 4)
            self.assertEqual(said.strip(), "nothing to do: 4 epochs done; pass epochs= above 4 "
                                           "(the total) to train on")
            said, h, _, _ = run(d, 5)  # as it says
            self.assertEqual(said.splitlines()[0], f"resuming {d} at epoch 5 of 5 from last.pt")
            self.assertEqual(len(h["loss"]), 5)
        with tempfile.TemporaryDirectory() as d:  # stopped early: the way on it names
            run(d, 30, patience=1, min_delta=1e9)
            said, h, model, opt = run(d, 30, patience=1, min_delta=1e9)
            last = os.path.join(d, "last.pt")
            self.assertEqual(said.strip(), "nothing to do: 2 epochs done (training had stopped "
                             "early); to train on anyway, load its weights and optimizer with "
                             f"loops.load_checkpoint({last!r}, model, optimizer) and fit into a "
                             "new checkpoint directory")
            loops.load_checkpoint(last, model, opt)
            with tempfile.TemporaryDirectory() as d2:
                more = self.fit(model, (X, y), torch.nn.MSELoss(), opt, epochs=3, checkpoint=d2,
                                batch_size=16)
            self.assertEqual(len(more["loss"]), 3)
            self.assertLess(more["loss"][-1], h["loss"][-1])

    def test_save_and_load_checkpoint_round_trip_with_optimizer(self):
        d = self.tmpdir()
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), 0.01)
        self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=1)
        path = os.path.join(d, "m.pt")
        loops.save_checkpoint(path, model, opt, note="hello", step=3)
        fresh = mlp(seed=5)
        fresh_opt = torch.optim.Adam(fresh.parameters(), 0.5)
        ck = loops.load_checkpoint(path, fresh, fresh_opt)
        self.assertEqual((ck["note"], ck["step"]), ("hello", 3))
        self.assertTrue(same_weights(model, fresh))
        self.assertEqual(fresh_opt.param_groups[0]["lr"], 0.01)
        with self.assertRaisesRegex(TypeError, "lambda|function"):
            loops.save_checkpoint(path, model, fn=lambda: 0)

    def test_saves_the_unwrapped_model(self):
        d = self.tmpdir()
        inner = mlp()
        loops.save_checkpoint(os.path.join(d, "m.pt"), torch.nn.DataParallel(inner))
        keys = torch.load(os.path.join(d, "m.pt"), weights_only=True)["model"].keys()
        self.assertEqual(set(keys), set(inner.state_dict()))


# --- 6. training controls ----------------------------------------------------------------

class ControlsTest(Quiet):
    def setUp(self):
        X, y = binary_data(160)
        self.train, self.val = (X[:120], y[:120]), (X[120:], y[120:])

    def test_monitor_defaults(self):
        for val, key in ((None, "loss"), (self.val, "val_loss")):
            d = self.tmpdir()
            model = mlp()
            h = self.fit(model, self.train, torch.nn.BCELoss(),
                         torch.optim.SGD(model.parameters(), 2.0), epochs=5, val=val,
                         checkpoint=d)
            best = torch.load(os.path.join(d, "best.pt"), weights_only=True)
            self.assertEqual(best["monitor"], key)
            self.assertEqual(best["epoch"], h[key].index(min(h[key])) + 1)

    def test_mode_max_on_accuracy(self):
        d = self.tmpdir()
        model = mlp()
        h = self.fit(model, self.train, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 2.),
                     epochs=5, val=self.val, metrics={"acc": "binary_accuracy"},
                     monitor="val_acc", mode="max", checkpoint=d)
        best = torch.load(os.path.join(d, "best.pt"), weights_only=True)
        self.assertEqual(best["epoch"], h["val_acc"].index(max(h["val_acc"])) + 1)

    def test_patience_stops_after_k_epochs_without_improvement(self):
        model = mlp()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            h = loops.fit(model, self.train, torch.nn.BCELoss(),
                          torch.optim.SGD(model.parameters(), 0.0), epochs=20, patience=3,
                          shuffle=False, verbose=2)
        self.assertEqual(len(h["loss"]), 4)  # epoch 1 is the best; 2, 3, 4 do not improve
        self.assertIn("early stop", out.getvalue())

    def test_restore_best_loads_the_best_weights(self):
        snapshots = {}
        model = mlp()

        def keep(epoch, logs):
            snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        h = self.fit(model, self.train, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 1),
                     epochs=5, monitor="loss", mode="max", restore_best=True, on_epoch_end=keep)
        best = h["loss"].index(max(h["loss"])) + 1
        self.assertNotEqual(best, 5)
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, snapshots[best][k]))

    def test_restore_best_from_best_pt_after_resume(self):
        d = self.tmpdir()
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), 1)
        self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=3, monitor="loss",
                 mode="max", checkpoint=d)
        self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=5, monitor="loss",
                 mode="max", checkpoint=d, resume=True, restore_best=True)
        best = torch.load(os.path.join(d, "best.pt"), weights_only=True)
        self.assertLess(best["epoch"], 4)
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, best["model"][k].to(v.device)))

    def test_epoch_scheduler_and_lr_history(self):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        h = self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=5, scheduler=sched)
        self.assertEqual(h["lr"], [0.1, 0.1, 0.05, 0.05, 0.025])

    def test_plateau_scheduler_receives_the_monitored_value(self):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), 0.0)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
        with mock.patch.object(sched, "step", wraps=sched.step) as step:
            h = self.fit(model, self.train, torch.nn.BCELoss(), opt, epochs=3, val=self.val,
                         scheduler=sched)
        self.assertEqual([c.args[0] for c in step.call_args_list], h["val_loss"])

    def test_step_scheduler_matches_a_hand_loop(self):
        X, y = self.train
        epochs, b = 3, 16
        steps = -(-len(X) // b)

        def setup():
            m = mlp()
            o = torch.optim.SGD(m.parameters(), 0.1, momentum=0.9)
            s = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=epochs * steps)
            return m, o, s
        ref, ro, rs = setup()
        lrs = []
        for _ in range(epochs):
            lrs.append(ro.param_groups[0]["lr"])
            hand_loop(ref, slices(X, y, b), torch.nn.BCELoss(), ro, 1, scheduler=rs)
        model, opt, sched = setup()
        h = self.fit(model, (X, y), torch.nn.BCELoss(), opt, epochs=epochs, batch_size=b,
                     shuffle=False, scheduler=sched, scheduler_interval="step")
        self.assertTrue(same_weights(model, ref))
        self.assertEqual(h["lr"], lrs)
        self.assertEqual(sched.last_epoch, epochs * steps)

    def test_clip_grad_norm_matches_a_hand_loop(self):
        X, y = self.train
        ref = mlp()
        hand_loop(ref, slices(X, y, 10), torch.nn.BCELoss(),
                  torch.optim.SGD(ref.parameters(), 0.5), 2, clip=0.01)
        model = mlp()
        self.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 0.5),
                 epochs=2, batch_size=10, shuffle=False, clip_grad_norm=0.01)
        self.assertTrue(same_weights(model, ref))
        unclipped = mlp()
        self.fit(unclipped, (X, y), torch.nn.BCELoss(),
                 torch.optim.SGD(unclipped.parameters(), 0.5), epochs=2, batch_size=10,
                 shuffle=False)
        self.assertFalse(same_weights(model, unclipped))

    def test_on_epoch_end_gets_the_logs_and_can_stop(self):
        model = mlp()
        seen = []

        def hook(epoch, logs):
            seen.append((epoch, sorted(logs)))
            return epoch == 2
        h = self.fit(model, self.train, torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), 1),
                     epochs=5, val=self.val, on_epoch_end=hook)
        self.assertEqual(len(h["loss"]), 2)
        self.assertEqual(seen[0], (1, sorted(h)))
        self.assertEqual([e for e, _ in seen], [1, 2])


# --- 7. progress -------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys, time, torch, loops
class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(4, 1)
    def forward(self, x):
        if self.training:  # slow enough for several refreshes an epoch
            time.sleep(0.004)
        return self.lin(x)
torch.manual_seed(0)
X, y = torch.randn(400, 4), torch.randn(400, 1)
model = Slow()
loops.fit(model, (X, y), torch.nn.MSELoss(), torch.optim.SGD(model.parameters(), 0.01),
          epochs=2, batch_size=2, verbose=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
"""


def run_in_pty(code, *args, columns=None):
    """Run a script with its stdout on a pseudo-terminal (``columns`` wide); return
    (output, seconds, process)."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=HERE, stdout=slave,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": HERE})
    os.close(slave)
    chunks = []
    while True:
        r, _, _ = select.select([master], [], [], 300)
        if not r:
            break
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=300)
    os.close(master)
    p.stderr_text = p.stderr.read().decode()
    p.stderr.close()
    return b"".join(chunks).decode(), time.perf_counter() - t0, p


NARROW_SCRIPT = PROGRESS_SCRIPT.replace("epochs=2, batch_size=2,", "epochs=2, batch_size=2, "
                                       "val=(X, y), metrics={'mae': 'mae', 'rmse': 'rmse'},")


class ProgressTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The scripts the tests read, all at once: each mostly sleeps or imports torch.
        runs = {"narrow": lambda: run_in_pty(NARROW_SCRIPT, columns=50),
                "wide": lambda: run_in_pty(NARROW_SCRIPT, columns=200),
                "pipe": lambda: run_python(PROGRESS_SCRIPT),
                "verbose 2": lambda: run_in_pty(PROGRESS_SCRIPT, "2")}
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            futures = {name: pool.submit(run) for name, run in runs.items()}
        cls.ran = {name: f.result() for name, f in futures.items()}

    def test_live_line_on_a_terminal(self):
        out, seconds, p = self.ran["wide"]  # with validation and two metrics
        self.assertEqual(p.returncode, 0, p.stderr_text)
        out = out.replace("\r\n", "\n")  # the terminal turns \n into \r\n
        lines = out.split("\n")
        self.assertEqual(len([ln for ln in lines if ln]), 2)
        refreshes = out.count("\r")
        self.assertGreaterEqual(refreshes, 6)  # about 0.8 s per epoch: several refreshes
        self.assertLessEqual(refreshes, 10 * seconds + 4)  # at most ~10 a second
        for i, line in enumerate(lines[:2], 1):
            updates = line.split("\r")
            self.assertRegex(updates[1], rf"^epoch {i}/2  \d+/200  \d+ it/s  ETA [\d.]+s  loss ")
            self.assertRegex(updates[-1].rstrip(), rf"^epoch {i}/2  loss \d\.\d{{4}}  mae .*  "
                                                   rf"val_rmse \d\.\d{{4}}  [\d.]+s")

    def test_live_line_fits_a_narrow_terminal(self):
        out, _, p = self.ran["narrow"]
        self.assertEqual(p.returncode, 0, p.stderr_text)
        lines = out.replace("\r\n", "\n").split("\n")
        refreshes = [u for ln in lines for u in ln.split("\r")[1:-1]]  # not the summaries
        self.assertGreaterEqual(len(refreshes), 4)
        for text in refreshes:  # one row each, so that the next \r overwrites all of it
            self.assertLessEqual(len(text), 49, text)
            self.assertRegex(text, r"^epoch \d/2  \d+/200")
        summaries = [ln.split("\r")[-1].rstrip() for ln in lines if ln]
        self.assertEqual(len(summaries), 2)
        self.assertRegex(summaries[0], r"val_rmse \d")  # whole, wider than the terminal
        wide, _, _ = self.ran["wide"]
        self.assertRegex(wide, r"it/s  ETA [\d.]+s  loss \S+  mae \S+  rmse")

    def test_summary_lines_only_into_a_pipe(self):
        p = self.ran["pipe"]
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("\r", p.stdout)
        lines = p.stdout.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertRegex(lines[0], r"^epoch 1/2  loss \d\.\d{4}  [\d.]+s  \* best$")

    def test_verbose_2_on_a_terminal_prints_no_carriage_return(self):
        out, _, p = self.ran["verbose 2"]
        self.assertEqual(p.returncode, 0)
        self.assertEqual(out.replace("\r\n", "\n").count("\r"), 0)
        self.assertEqual(len(out.splitlines()), 2)

    def test_verbose_0_prints_nothing(self):
        X, y = binary_data()
        model = mlp()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            loops.fit(model, (X, y), torch.nn.BCELoss(), torch.optim.SGD(model.parameters(), .1),
                      epochs=2, verbose=0)
        self.assertEqual(out.getvalue(), "")

    def test_summary_golden_strings(self):
        logs = {"epoch": 7, "loss": 0.48213, "acc": 0.7734, "val_loss": 0.50119,
                "val_acc": 0.75, "lr": 0.1, "time": 0.41}
        self.assertEqual(
            loops._format_summary(7, 50, logs, percent={"acc"}, seconds=0.41, best=True),
            "epoch 7/50  loss 0.4821  acc 77.3%  val_loss 0.5012  val_acc 75.0%  0.41s  * best")
        self.assertEqual(
            loops._format_summary(12, 100, {"loss": 45123.4, "mae": 0.000123, "r": math.nan},
                                  seconds=75.2),
            "epoch 12/100  loss 45123.4  mae 1.230e-04  r nan  1:15")

    def test_progress_golden_strings(self):
        self.assertEqual(
            loops._format_progress(3, 50, 41, 77, {"loss": 0.48213}, 0.5, 41),
            "epoch 3/50  41/77  82 it/s  ETA 0.44s  loss 0.4821")
        self.assertEqual(
            loops._format_progress(1, 2, 5, None, {"loss": 1.5, "acc": 0.5}, 2.0, 5,
                                   percent={"acc"}),
            "epoch 1/2  5/?  2.50 it/s  loss 1.5000  acc 50.0%")


# --- 8. GPU-ready: no host read per step ---------------------------------------------------

class HostReadsTest(Quiet):
    def count_reads(self, batch_size):
        X, y = binary_data(400)
        model = mlp()
        reads = []
        patches = []
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, **k):
                reads.append(1)
                return _real(self, *a, **k)
            patches.append(mock.patch.object(torch.Tensor, name, counted))
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            stack.enter_context(mock.patch.object(loops, "_CPU_CHECK_SECONDS", 1e9))
            self.fit(model, (X[:300], y[:300]), torch.nn.BCELoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=3, val=(X[300:], y[300:]),
                     batch_size=batch_size, metrics={"acc": "binary_accuracy", "f1": "f1"})
        return len(reads)

    def test_reads_do_not_grow_with_the_number_of_steps(self):
        few, many = self.count_reads(100), self.count_reads(2)  # 3 vs 150 steps an epoch
        self.assertEqual(few, many)
        self.assertLessEqual(many, 1 + 3 * 3)  # the seed draw; per epoch: tick, train, val

    @unittest.skipUnless(torch.cuda.is_available(), "needs CUDA")
    def test_cuda_epoch_does_not_sync_per_step(self):
        import warnings
        X, y = binary_data(4000)
        X, y = X.cuda(), y.cuda()

        def syncs(batch_size):
            model = mlp().cuda()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    self.fit(model, (X, y), torch.nn.BCELoss(),
                             torch.optim.SGD(model.parameters(), 0.1), epochs=2,
                             batch_size=batch_size, metrics={"acc": "binary_accuracy"})
            finally:
                torch.cuda.set_sync_debug_mode("default")
            return len(w)
        self.assertEqual(syncs(1000), syncs(10))  # 4 vs 400 steps an epoch


if __name__ == "__main__":
    unittest.main()


# --- the front door: README example, examples, run_all.sh -----------------------------------

class FrontDoorTest(unittest.TestCase):
    def test_readme_example_runs(self):
        with open(os.path.join(HERE, "README.md")) as f:
            text = f.read()
        code = text.split("```python\n", 1)[1].split("```", 1)[0]
        with tempfile.TemporaryDirectory() as d:
            p = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True,
                               text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": HERE})
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(sorted(os.listdir(os.path.join(d, "runs", "demo"))),
                             ["best.pt", "history.csv", "last.pt", "run.json"])
            # every output line the README quotes is real (all but the times)
            def no_time(line):
                return re.sub(r"  [\d.:]+s(?=  |$)", "", line)
            quoted = [ln[2:] for ln in code.splitlines() if ln.startswith("# ") and ln != "# ..."]
            self.assertGreaterEqual(len(quoted), 4)
            printed = [no_time(ln) for ln in p.stdout.splitlines()]
            for line in quoted:
                self.assertIn(no_time(line), printed)
            # and it runs again: resume=True continues the finished run
            again = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True,
                                   text=True, timeout=120, env={**os.environ, "PYTHONPATH": HERE})
            self.assertEqual(again.returncode, 0, again.stderr)
            self.assertIn("nothing to do: 41 epochs done (training had stopped early)",
                          again.stdout)

    def test_the_readme_is_a_manual_whose_links_resolve(self):
        # A manual, not a record of measurements (those are bench/README.md's, dated)
        with open(os.path.join(HERE, "README.md")) as f:
            lines = f.read().splitlines()
        self.assertLessEqual(len(lines), 700)
        self.assertEqual([ln for ln in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", ln)], [])
        heads = [i for i, ln in enumerate(lines) if ln.startswith("## ")]
        start = lines.index("## Quick start")
        self.assertLessEqual(heads[heads.index(start) + 1] - start, 30)
        self.assertLess(lines.index("## Make it yours"), 300)
        pages = ["README.md", os.path.join("bench", "README.md")] + [
            os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(HERE, "docs")))]
        for page in pages:
            with open(os.path.join(HERE, page)) as f:
                text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # links, not code
            for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)", text):
                if target.startswith("http"):
                    continue
                path = os.path.normpath(os.path.join(HERE, os.path.dirname(page), target or
                                                     os.path.basename(page)))
                self.assertTrue(os.path.exists(path), f"{page}: {target} does not exist")
                if anchor:
                    with open(path) as f:
                        anchors = {re.sub(r"[^\w\- ]", "", ln.lstrip("#").strip().lower())
                                   .replace(" ", "-") for ln in f if ln.startswith("#")}
                    self.assertIn(anchor, anchors, f"{page}: {target}#{anchor}")

    def test_run_all_reports_failures_and_runs_every_example_still(self):
        # run_all itself is run over every example by test_datasets.RecipesTest, whose
        # recipe checks read its output; here, a failing example is reported, the others
        # still run, and the exit code says so: a stand-in python (the real one for
        # run_all's own check) fails linear.py
        with tempfile.TemporaryDirectory() as d:
            fake = os.path.join(d, "python")
            with open(fake, "w") as f:
                f.write('#!/bin/sh\ncase "$1" in\n  -c) exec "%s" "$@" ;;\n'
                        '  *linear.py) exit 3 ;;\n  *) echo "ran $1" ;;\nesac\n'
                        % sys.executable)
            os.chmod(fake, 0o755)
            p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")],
                               env={**os.environ, "PYTHON": fake}, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=300)
            self.assertEqual(p.returncode, 1)
            self.assertIn("!! examples/linear.py failed", p.stdout)
            self.assertIn("== 1 example(s) failed: examples/linear.py", p.stdout)
            for script in sorted(os.listdir(os.path.join(HERE, "examples"))):
                if script.endswith(".py") and script[0] != "_" and script != "linear.py":
                    self.assertIn(f"ran examples/{script}", p.stdout)
