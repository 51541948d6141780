"""Tests of the seams that make the loop yours: mode="auto", forward, train_step, val_fn,
on_batch_end and whole_set metrics. Each against an oracle: a hand-written loop, a value
computed on the whole set, scikit-learn where it is installed.
"""
import collections
import csv
import os
import tempfile
import unittest

import torch

import loops

DEVICE = torch.device(os.environ.get("LOOPS_TEST_DEVICE", "cpu"))


def classes(n=160, seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    y = (X[:, :k] + 0.8 * torch.randn(n, k, generator=g)).argmax(1)
    return X.to(DEVICE), y.to(DEVICE)


def net(n_in=5, n_out=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, n_out)).to(DEVICE)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


class Seams(unittest.TestCase):
    def fit(self, *args, **kw):
        kw.setdefault("verbose", 0)
        return loops.fit(*args, **kw)

    def tmpdir(self):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        return d.name


class ModeTest(Seams):
    def test_auto_knows_accuracy_is_better_high_and_restore_best_keeps_that_epoch(self):
        X, y = classes()
        train, val = (X[:110], y[:110]), (X[110:], y[110:])
        d = self.tmpdir()
        model = net()
        h = self.fit(model, train, torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.05), epochs=8, val=val,
                     metrics={"acc": "accuracy"}, monitor="val_acc", checkpoint=d,
                     restore_best=True, batch_size=16)
        acc = h["val_acc"]
        best = acc.index(max(acc)) + 1  # the first epoch at the highest accuracy
        self.assertNotEqual(best, acc.index(min(acc)) + 1)
        self.assertEqual(loops.load_checkpoint(os.path.join(d, "best.pt"))["epoch"], best)
        self.assertEqual(h["best_epoch"][-1], best)
        again = loops.evaluate(model, val, metrics={"acc": "accuracy"})
        self.assertEqual(again["acc"], max(acc))  # restore_best gave back the best model

    def test_directions_of_the_builtins_by_name_and_by_function_with_or_without_val(self):
        X, y = classes()
        cases = {"f1": ("f1", "max"), "val_f1": (loops.f1, "max"), "mae": ("mae", "min"),
                 "val_mape": (loops.mape, "min"), "val_binary_accuracy": ("binary_accuracy",
                                                                           "max")}
        for monitor, (metric, direction) in cases.items():
            name = monitor.removeprefix("val_")
            model = net(n_out=1 if name in ("mae", "mape", "binary_accuracy") else 3)
            yy = y.float().unsqueeze(1) if model[-1].out_features == 1 else y
            loss_fn = torch.nn.MSELoss() if model[-1].out_features == 1 else \
                torch.nn.CrossEntropyLoss()
            h = self.fit(model, (X, yy), loss_fn, torch.optim.SGD(model.parameters(), 0.01),
                         epochs=4, val=(X, yy), metrics={name: metric}, monitor=monitor)
            values, best = h[monitor], int(h["best_epoch"][-1])
            want = (max if direction == "max" else min)(values)
            self.assertEqual(values[best - 1], want, (monitor, values, best))

    def test_plots_mark_the_best_the_run_saved_and_no_other(self):
        import json
        import subprocess
        import sys
        import plots_ascii
        X, y = classes()
        train, val = (X[:110], y[:110]), (X[110:], y[110:])
        mine = {"prec": "precision", "acc": loops.accuracy,
                "top2": lambda p, t: (p.topk(2, 1).indices == t[:, None]).any(1).double().mean()}
        runs = []
        for lr in (0.05, 0.2):
            d = os.path.join(self.tmpdir(), f"lr{lr}")
            model = net()
            h = self.fit(model, train, torch.nn.CrossEntropyLoss(),
                         torch.optim.SGD(model.parameters(), lr), epochs=6, val=val, metrics=mine,
                         monitor="val_top2", mode="max", checkpoint=d, batch_size=16)
            want = {"loss": "min", "val_loss": "min", "prec": "max", "val_prec": "max",
                    "acc": "max", "val_acc": "max", "top2": "max", "val_top2": "max"}
            self.assertEqual(h.better, want)  # top2 is known by the monitor's mode only
            with open(os.path.join(d, "run.json")) as f:
                self.assertEqual(json.load(f), {"monitor": "val_top2", "mode": "max",
                                                "better": want})
            runs.append((d, h))
        h = runs[0][1]
        saved = os.path.join(self.tmpdir(), "history.pt")
        torch.save(h, saved)  # as a user may: it loads with weights_only, as a plain mapping
        self.assertEqual(dict(torch.load(saved, weights_only=True)), dict(h))
        import copy
        self.assertEqual(copy.deepcopy(h).better, h.better)
        self.assertNotEqual(h["val_acc"].index(max(h["val_acc"])), 0)  # the case it hid in
        chart = plots_ascii.plot_history(h, keys=["acc", "prec"], width=60)
        for key in ("val_acc", "val_prec", "acc"):
            best = max(h[key])
            self.assertIn(f"{key}  last ", chart)
            self.assertRegex(chart, rf"{key} +last [0-9.]+  best {best:.3f} @ "
                                    rf"{h[key].index(best) + 1}\b")
        plain = plots_ascii.plot_history(dict(h), keys=["acc"])  # a plain dict: no directions
        self.assertNotIn("best 0", plain.replace("best.pt", ""))
        # the command line reads each run's run.json beside its history.csv
        paths = [os.path.join(d, "history.csv") for d, _ in runs]
        out = subprocess.run([sys.executable, os.path.join(os.path.dirname(loops.__file__),
                                                           "plots_ascii.py"), *paths,
                              "--keys", "val_acc"], capture_output=True, text=True, timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr)
        for (d, hist), glyph in zip(runs, "*o"):
            best = max(hist["val_acc"])
            self.assertRegex(out.stdout, rf"[{glyph}] {os.path.basename(d)} +last [0-9.]+  best "
                                         rf"{best:.3f} @ {hist['val_acc'].index(best) + 1}\b")
        os.remove(os.path.join(runs[0][0], "run.json"))  # a history.csv alone: no best claimed
        out = subprocess.run([sys.executable, os.path.join(os.path.dirname(loops.__file__),
                                                           "plots_ascii.py"), paths[0],
                              "--keys", "val_acc"], capture_output=True, text=True, timeout=300)
        self.assertRegex(out.stdout, r"\* lr0\.05  last [0-9.]+\n")

    def test_a_monitor_of_unknown_direction_is_refused_before_any_work(self):
        X, y = classes()
        model = net()
        before = [p.detach().clone() for p in model.parameters()]
        d = os.path.join(self.tmpdir(), "run")
        mine = {"top2": lambda p, t: (p.topk(2, 1).indices == t[:, None]).any(1).double().mean()}
        with self.assertRaisesRegex(ValueError, "mode='auto' does not know whether a higher "
                                                "or a lower 'val_top2' is better"):
            self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=2, val=(X, y),
                     metrics=mine, monitor="val_top2", checkpoint=d)
        self.assertFalse(os.path.exists(d))
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        h = self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=2, val=(X, y),
                     metrics=mine, monitor="val_top2", mode="max")
        self.assertEqual(len(h["val_top2"]), 2)
        with self.assertRaisesRegex(ValueError, "mode must be 'auto', 'min' or 'max'"):
            self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1, mode="up")

    def test_a_resumed_run_keeps_its_direction(self):
        X, y = classes()
        d = self.tmpdir()
        model = net()
        opt = torch.optim.SGD(model.parameters(), 0.05)
        kw = dict(epochs=2, val=(X, y), metrics={"acc": "accuracy"}, checkpoint=d)
        self.fit(model, (X, y), torch.nn.CrossEntropyLoss(), opt, monitor="val_acc", **kw)
        ck = loops.load_checkpoint(os.path.join(d, "last.pt"))
        self.assertEqual((ck["monitor"], ck["mode"]), ("val_acc", "max"))
        for other in (dict(monitor="val_acc", mode="min"), dict(monitor="val_loss")):
            with self.assertRaisesRegex(ValueError, "monitored 'val_acc' \\(mode 'max'\\)"):
                self.fit(model, (X, y), torch.nn.CrossEntropyLoss(), opt, resume=True,
                         **{**kw, "epochs": 3}, **other)
        h = self.fit(model, (X, y), torch.nn.CrossEntropyLoss(), opt, resume=True,
                     monitor="val_acc", **{**kw, "epochs": 3})
        self.assertEqual(len(h["epoch"]), 3)


class DictModel(torch.nn.Module):
    """A model of several inputs that returns a tuple, as a tokenizer-fed model does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(5, 8), torch.nn.Linear(2, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, extra, mask):
        h = torch.relu(self.a(x) + self.b(extra)) * mask[:, None]
        return self.head(h), h.mean()


def dict_batches(X, y, b):
    g = torch.Generator().manual_seed(3)
    extra = torch.randn(len(X), 2, generator=g).to(X.device)
    mask = (torch.rand(len(X), generator=g) > 0.1).float().to(X.device)
    return [{"x": X[i:i + b], "extra": extra[i:i + b], "mask": mask[i:i + b],
             "labels": y[i:i + b]} for i in range(0, len(X), b)]


def dict_forward(model, batch):
    logits, _ = model(batch["x"], batch["extra"], batch["mask"])
    return logits, batch["labels"]


class ForwardTest(Seams):
    def test_dict_batches_through_fit_equal_a_hand_written_loop_bit_for_bit(self):
        X, y = classes()
        batches = dict_batches(X, y, 16)
        loss_fn = torch.nn.CrossEntropyLoss()
        ref = DictModel().to(DEVICE)
        opt = torch.optim.Adam(ref.parameters(), 1e-2)
        means = []
        for _ in range(3):
            total = 0.0
            for batch in batches:
                opt.zero_grad()
                logits, _ = ref(batch["x"], batch["extra"], batch["mask"])
                loss = loss_fn(logits, batch["labels"])
                loss.backward()
                opt.step()
                total += loss.item() * len(batch["labels"])
            means.append(total / len(X))
        model = DictModel().to(DEVICE)
        h = self.fit(model, batches, loss_fn, torch.optim.Adam(model.parameters(), 1e-2),
                     epochs=3, forward=dict_forward, val=batches,
                     metrics={"acc": "accuracy", "f1": "f1"})
        self.assertTrue(same_weights(model, ref))
        for got, want in zip(h["loss"], means):
            self.assertAlmostEqual(got, want, places=12)
        # validation values are exact: the whole set at once, on the final weights
        logits = torch.cat([dict_forward(model, b)[0] for b in batches]).detach()
        self.assertAlmostEqual(h["val_acc"][-1], loops.accuracy(logits, y).item(), places=12)
        self.assertAlmostEqual(h["val_f1"][-1], loops.f1(logits, y).item(), places=12)
        self.assertAlmostEqual(h["val_loss"][-1], loss_fn(logits, y).item(), places=6)

    def test_predict_and_evaluate_take_forward(self):
        X, y = classes()
        batches = dict_batches(X, y, 32)
        model = DictModel().to(DEVICE)
        with torch.no_grad():
            want = torch.cat([dict_forward(model, b)[0] for b in batches]).cpu()
        self.assertTrue(torch.equal(loops.predict(model, batches, forward=dict_forward), want))
        logs = loops.evaluate(model, batches, torch.nn.CrossEntropyLoss(), forward=dict_forward,
                              metrics={"acc": "accuracy"})
        self.assertAlmostEqual(logs["acc"], loops.accuracy(want, y.cpu()).item(), places=12)
        # a tensor X with forward: forward gets each batch of X
        lin = net()
        got = loops.predict(lin, X, batch_size=7, forward=lambda m, xb: (m(xb) * 2, None))
        self.assertTrue(torch.allclose(got, 2 * lin(X).detach().cpu()))

    def test_accumulation_and_precision_hold_under_forward(self):
        X, y = classes(n=96)
        tup = lambda m, b: (m(b["x"]), b["labels"])  # noqa: E731
        big = [{"x": X[i:i + 32], "labels": y[i:i + 32]} for i in range(0, 96, 32)]
        small = [{"x": X[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 96, 8)]
        a, b = net(), net()
        self.fit(a, big, torch.nn.CrossEntropyLoss(), torch.optim.SGD(a.parameters(), 0.1),
                 epochs=2, forward=tup)
        self.fit(b, small, torch.nn.CrossEntropyLoss(), torch.optim.SGD(b.parameters(), 0.1),
                 epochs=2, forward=tup, accumulate=4)
        for p, q in zip(a.parameters(), b.parameters()):
            self.assertTrue(torch.allclose(p, q, atol=1e-6))
        seen = []
        probe = lambda m, batch: (seen.append(torch.is_autocast_enabled("cpu")) or m(batch["x"]),
                                  batch["labels"])  # noqa: E731
        c = net()
        self.fit(c, small, torch.nn.CrossEntropyLoss(), torch.optim.SGD(c.parameters(), 0.1),
                 epochs=1, forward=probe, precision="bf16", val=small)
        self.assertTrue(seen and all(seen))

    def test_a_forward_that_returns_one_value_is_named(self):
        X, y = classes()
        model = net()
        with self.assertRaisesRegex(TypeError, "forward returned a tensor of shape .*; "
                                               "expected a pair \\(y_pred, y\\)"):
            self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1,
                     forward=lambda m, b: m(b[0]))
        with self.assertRaisesRegex(TypeError, "forward must be callable"):
            loops.predict(model, X, forward="yes")


def gan_parts():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"G": torch.nn.Linear(2, 2), "D": torch.nn.Linear(2, 1)})
    model.to(DEVICE)
    optimizers = {k: torch.optim.Adam(model[k].parameters(), 1e-2) for k in ("G", "D")}
    return model, optimizers


def gan_step(model, batch, optimizers):
    x, _ = batch
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    fake = model["G"](torch.randn(len(x), 2, device=x.device))
    optimizers["D"].zero_grad()
    d_loss = bce(model["D"](x), torch.ones(len(x), 1, device=x.device)) + bce(
        model["D"](fake.detach()), torch.zeros(len(x), 1, device=x.device))
    d_loss.backward()
    optimizers["D"].step()
    optimizers["G"].zero_grad()
    g_loss = bce(model["D"](fake), torch.ones(len(x), 1, device=x.device))
    g_loss.backward()
    optimizers["G"].step()
    return {"d_loss": d_loss, "g_loss": g_loss}


class ModelsPeopleUseTest(Seams):
    """Hugging Face's batches and outputs, without Hugging Face (test_hf.py has the real one)."""

    def test_userdict_batches_are_moved_counted_by_rows_and_keep_their_type(self):
        # A BatchEncoding (a UserDict) was not moved to the device, and under accumulate=2 a
        # short last group was weighted by its number of keys: 0 weights equal to plain dicts.
        X, y = classes(n=54)  # batches of 16, 16, 16, 6: groups (16, 16), (16, 6)
        seen, runs = set(), {}
        for kind in (dict, collections.UserDict):
            batches = [kind(b) for b in dict_batches(X, y, 16)]

            def forward(model, batch):
                seen.add(type(batch))
                return dict_forward(model, batch)
            model = DictModel().to(DEVICE)
            self.fit(model, batches, torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=2, accumulate=2,
                     forward=forward)
            runs[kind] = model
        self.assertTrue(same_weights(runs[dict], runs[collections.UserDict]))
        self.assertEqual(seen, {dict, collections.UserDict})  # each as it came

    def test_a_model_that_computes_its_own_loss(self):
        # Hugging Face models compute their loss when given labels: forward may return it
        # third, with loss_fn=None (refused before); the epoch loss is the rows' mean of it.
        class Output(collections.OrderedDict):  # a ModelOutput: keys and attributes
            __getattr__ = collections.OrderedDict.__getitem__

        class OwnLoss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net()

            def forward(self, x, labels=None):
                logits = self.net(x)
                out = Output(logits=logits)
                if labels is not None:
                    out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
                return out
        X, y = classes(n=100)

        def own(model, batch):
            out = model(batch[0], labels=batch[1])
            return out.logits, batch[1], out.loss
        runs = {}
        for name, forward, loss_fn in (
                ("own", own, None),
                ("loss_fn", lambda m, b: (m(b[0]).logits, b[1]), torch.nn.CrossEntropyLoss())):
            model = OwnLoss().to(DEVICE)
            runs[name] = model, self.fit(
                model, (X, y), loss_fn, torch.optim.Adam(model.parameters(), 1e-2), epochs=3,
                batch_size=16, accumulate=2, val=(X, y), forward=forward,
                metrics={"acc": "accuracy"})
        (a, h_own), (b, h_fn) = runs["own"], runs["loss_fn"]
        self.assertTrue(same_weights(a, b))
        self.assertEqual({k: v for k, v in h_own.items() if k != "time"},
                         {k: v for k, v in h_fn.items() if k != "time"})
        logs = loops.evaluate(a, (X, y), forward=own, metrics={"acc": "accuracy"})
        self.assertAlmostEqual(logs["loss"], h_own["val_loss"][-1], places=12)
        with self.assertRaisesRegex(TypeError, "no loss to train on: loss_fn is None, and "
                                               "forward returned \\(y_pred, y\\)"):
            self.fit(a, (X, y), None, torch.optim.SGD(a.parameters(), 0.1), epochs=1,
                     forward=lambda m, b: (m(b[0]).logits, b[1]))

    def test_the_hint_for_mapping_batches_works_on_them(self):
        # The hint for a model that returns a tuple, model(batch[0])[0], gave a bare
        # KeyError: 0 on dict batches; a dict batch without forward= did not name forward=.
        class Output(collections.OrderedDict):
            __getattr__ = collections.OrderedDict.__getitem__

        class HFLike(DictModel):  # keyword inputs, labels in, a ModelOutput with its loss out
            def forward(self, x, extra, mask, labels=None):
                logits, _ = super().forward(x, extra, mask)
                return Output(logits=logits, loss=torch.nn.functional.cross_entropy(
                    logits, labels))
        X, y = classes(n=40)
        batches = [collections.UserDict(b) for b in dict_batches(X, y, 8)]
        model = HFLike().to(DEVICE)
        with self.assertRaises(TypeError) as err:
            self.fit(model, batches, torch.nn.CrossEntropyLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=1)
        said = str(err.exception)
        self.assertIn("a batch is a UserDict with keys ['x', 'extra', 'mask', 'labels']", said)
        hint = said.split("forward=lambda model, batch: ")[1].split("; README")[0]
        h = self.fit(model, batches, None, torch.optim.SGD(model.parameters(), 0.1), epochs=2,
                     forward=eval("lambda model, batch: " + hint))  # as the error says
        self.assertLess(h["loss"][-1], h["loss"][0])


class TrainStepTest(Seams):
    def test_the_values_are_the_rows_mean_of_the_batch_means_and_both_optimizers_resume(self):
        real = (torch.randn(100, 2, generator=torch.Generator().manual_seed(1)) + 2).to(DEVICE)
        data = (real, torch.zeros(100, device=DEVICE))
        seen = []

        def recording(model, batch, optimizers):
            out = gan_step(model, batch, optimizers)
            seen.append((len(batch[0]), out["d_loss"].item(), out["g_loss"].item()))
            return out
        model, optimizers = gan_parts()
        d = self.tmpdir()
        h = self.fit(model, data, None, optimizers, epochs=2, batch_size=32, seed=0,
                     train_step=recording, checkpoint=d, monitor="g_loss", mode="min")
        self.assertEqual(list(h), ["epoch", "d_loss", "g_loss", "lr_G", "lr_D", "time",
                                   "best_epoch"])
        for epoch in range(2):
            rows = seen[epoch * 4:(epoch + 1) * 4]  # 32, 32, 32, 4 rows
            self.assertEqual([n for n, _, _ in rows], [32, 32, 32, 4])
            for i, key in ((1, "d_loss"), (2, "g_loss")):
                want = sum(n * v[i - 1] for n, *v in rows) / 100
                self.assertAlmostEqual(h[key][epoch], want, places=6)
        ck = loops.load_checkpoint(os.path.join(d, "last.pt"))
        self.assertEqual(sorted(ck["optimizer"]), ["D", "G"])
        self.assertEqual(ck["optimizer_type"], {"G": "Adam", "D": "Adam"})
        # 2 epochs, then resumed to 4, equals 4 straight
        model_b, opts_b = gan_parts()
        self.fit(model_b, data, None, opts_b, epochs=4, batch_size=32, seed=0,
                 train_step=gan_step, checkpoint=self.tmpdir(), monitor="g_loss", mode="min")
        model_c, opts_c = gan_parts()
        h_c = self.fit(model_c, data, None, opts_c, epochs=4, batch_size=32, seed=0,
                       train_step=gan_step, checkpoint=d, resume=True, monitor="g_loss",
                       mode="min")
        self.assertTrue(same_weights(model_b, model_c))
        for k in ("G", "D"):
            sa, sb = opts_b[k].state_dict()["state"], opts_c[k].state_dict()["state"]
            self.assertTrue(all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa))
        self.assertEqual(h_c["epoch"], [1.0, 2.0, 3.0, 4.0])

    def test_every_steps_values_are_checked_naming_the_step(self):
        # Only the first step's were: later 2-element tensors landed under the wrong names,
        # an extra name was dropped, a missing one gave a bare KeyError, and one value
        # turned from () to (1, 1) a bare torch.stack error.
        real = (torch.randn(100, 2, generator=torch.Generator().manual_seed(1)) + 2).to(DEVICE)
        data = (real, torch.zeros(100, device=DEVICE))  # 4 steps an epoch at batch 32

        def changed_at_step_6(change):
            calls = [0]

            def step(model, batch, opts):
                calls[0] += 1
                out = gan_step(model, batch, opts)
                return change(out) if calls[0] == 6 else out
            return step
        at = r" at step 6 \(as on_batch_end counts\)"
        for change, says in (
                (lambda o: {k: v.repeat(2) for k, v in o.items()},
                 r"returned 'd_loss': a tensor of shape \(2,\)" + at),
                (lambda o: {**o, "extra": o["d_loss"]},
                 r"returned \['d_loss', 'g_loss', 'extra'\]" + at + r"; its first step returned"),
                (lambda o: {"d_loss": o["d_loss"]}, r"returned \['d_loss'\]" + at)):
            with self.subTest(says):
                model, optimizers = gan_parts()
                with self.assertRaisesRegex(ValueError, "train_step " + says):
                    self.fit(model, data, None, optimizers, epochs=2, batch_size=32,
                             train_step=changed_at_step_6(change), monitor="g_loss", mode="min")
        model, optimizers = gan_parts()  # () and (1, 1) are both one value: fine
        h = self.fit(model, data, None, optimizers, epochs=2, batch_size=32, monitor="g_loss",
                     mode="min", train_step=changed_at_step_6(
                         lambda o: {"d_loss": o["d_loss"].reshape(1, 1), "g_loss": o["g_loss"]}))
        self.assertEqual(len(h["d_loss"]), 2)

    def test_the_data_may_be_X_alone_or_any_batches_and_metrics_need_val(self):
        # (X, torch.zeros(len(X))) had to be faked; metrics without val were silently unused
        real = (torch.randn(100, 2, generator=torch.Generator().manual_seed(1)) + 2).to(DEVICE)
        seen = []

        def step(model, batch, opts):
            seen.append(type(batch).__name__)
            return gan_step(model, (batch["x"] if isinstance(batch, dict) else batch, None),
                            opts)
        for data, kind in ((real, "Tensor"), ([{"x": real[i:i + 25]} for i in range(0, 100, 25)],
                                              "dict")):
            model, optimizers = gan_parts()
            h = self.fit(model, data, None, optimizers, epochs=2, batch_size=25,
                         train_step=step, monitor="g_loss", mode="min")
            self.assertEqual(len(h["g_loss"]), 2)
            self.assertEqual(set(seen), {kind})
            seen.clear()
        with self.assertRaisesRegex(ValueError, "metrics= with train_step are computed in "
                                                "validation only.*give val= too"):
            self.fit(model, real, None, optimizers, epochs=1, train_step=step,
                     monitor="g_loss", mode="min", metrics={"m": "mae"})

    def test_a_scheduler_per_optimizer_is_saved_restored_and_stepped(self):
        # With a dict of optimizers the only place for their schedulers was inside
        # train_step, where last.pt did not see them: a resumed run's lr_D went elsewhere.
        real = (torch.randn(100, 2, generator=torch.Generator().manual_seed(1)) + 2).to(DEVICE)
        data = (real, torch.zeros(100, device=DEVICE))

        def run(epochs, d, interval, resume=False):
            model, opts = gan_parts()
            schedulers = {"G": torch.optim.lr_scheduler.StepLR(opts["G"], 3, 0.5),
                          "D": torch.optim.lr_scheduler.ExponentialLR(opts["D"], 0.9)}
            h = self.fit(model, data, None, opts, epochs=epochs, batch_size=32, seed=0,
                         train_step=gan_step, checkpoint=d, resume=resume, monitor="g_loss",
                         mode="min", scheduler=schedulers, scheduler_interval=interval)
            return model, schedulers, h
        for interval, steps in (("epoch", 4), ("step", 16)):
            with self.subTest(interval):
                whole, sched_whole, h_whole = run(4, self.tmpdir(), interval)
                d = self.tmpdir()
                run(2, d, interval)
                resumed, sched_resumed, h_resumed = run(4, d, interval, resume=True)
                self.assertTrue(same_weights(whole, resumed))
                for k in ("G", "D"):
                    self.assertEqual(sched_whole[k].last_epoch, steps)
                    self.assertEqual(sched_resumed[k].state_dict(), sched_whole[k].state_dict())
                    self.assertEqual(h_resumed[f"lr_{k}"], h_whole[f"lr_{k}"])
                self.assertNotEqual(h_whole["lr_D"][0], h_whole["lr_D"][-1])  # it stepped
        model, opts = gan_parts()
        with self.assertRaisesRegex(ValueError, r"scheduler is a dict with the keys \['G'\]; "
                                                r"expected one scheduler per optimizer"):
            self.fit(model, data, None, opts, epochs=1, train_step=gan_step, monitor="g_loss",
                     mode="min", scheduler={"G": torch.optim.lr_scheduler.StepLR(opts["G"], 1)})

    def test_validation_without_a_loss_reports_metrics_and_no_val_loss(self):
        X, y = classes()
        model = net()
        opt = torch.optim.SGD(model.parameters(), 0.1)

        def step(model, batch, optimizer):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            optimizer.step()
            return {"loss": loss}
        h = self.fit(model, (X, y), None, opt, epochs=2, train_step=step, val=(X, y),
                     metrics={"acc": "accuracy"})
        self.assertEqual(list(h), ["epoch", "loss", "val_acc", "lr", "time", "best_epoch"])
        self.assertEqual(h["best_epoch"], [1.0, 2.0] if h["loss"][1] < h["loss"][0] else
                         [1.0, 1.0])  # the default monitor: train_step's "loss", lower better

    def test_bad_uses_are_refused_saying_why(self):
        X, y = classes()
        model, optimizers = gan_parts()
        data = (X[:, :2], y)
        for option, pattern in ((dict(precision="bf16"), "precision='bf16' is an option of "
                                                        "loops' own step"),
                                (dict(accumulate=2), "accumulate=2"),
                                (dict(clip_grad_norm=1.0), "clip_grad_norm=1.0")):
            with self.assertRaisesRegex(ValueError, pattern):
                self.fit(model, data, None, optimizers, epochs=1, train_step=gan_step,
                         monitor="g_loss", mode="min", **option)
        with self.assertRaisesRegex(TypeError, "optimizer is a dict: several optimizers need "
                                               "your own step"):
            self.fit(model, data, torch.nn.MSELoss(), optimizers, epochs=1)
        with self.assertRaisesRegex(ValueError, "train_step returned 'd_loss': a tensor of "
                                                "shape \\(2,\\); expected a scalar"):
            self.fit(model, data, None, optimizers, epochs=1, monitor="g_loss", mode="min",
                     train_step=lambda m, b, o: {"d_loss": torch.zeros(2), "g_loss": 0})
        with self.assertRaisesRegex(TypeError, "train_step returned a tuple"):
            self.fit(model, data, None, optimizers, epochs=1, monitor="g_loss", mode="min",
                     train_step=lambda m, b, o: (1, 2))
        with self.assertRaisesRegex(ValueError, r"train_step returned \['d_loss', 'g_loss'\], "
                                                "not 'loss', the monitor"):  # at its first step
            self.fit(model, data, None, optimizers, epochs=1, train_step=gan_step)


class ValFnTest(Seams):
    def test_values_join_the_history_the_csv_the_summary_and_last_pt_and_can_be_the_monitor(self):
        X, y = classes()
        model = net()
        d = self.tmpdir()
        calls = []

        def val_fn(model):
            calls.append((model.training, torch.is_grad_enabled()))
            return {"score": float(len(calls) % 3)}  # 1, 2, 0, 1: best at epoch 2
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            h = self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                         torch.optim.SGD(model.parameters(), 0.1), epochs=4, val_fn=val_fn,
                         monitor="score", mode="max", checkpoint=d, verbose=2)
        self.assertEqual(calls, [(False, False)] * 4)  # eval mode, no grad
        self.assertEqual(h["score"], [1.0, 2.0, 0.0, 1.0])
        self.assertEqual(h["best_epoch"], [1.0, 2.0, 2.0, 2.0])
        self.assertEqual(loops.load_checkpoint(os.path.join(d, "best.pt"))["epoch"], 2)
        self.assertEqual(loops.load_checkpoint(os.path.join(d, "last.pt"))["history"], h)
        with open(os.path.join(d, "history.csv")) as f:
            self.assertIn("score", next(csv.reader(f)))
        self.assertIn("score 2.0000", out.getvalue().splitlines()[1])
        for bad in ({"score": "high"}, {"score": torch.tensor(1.0)}, [1.0]):
            with self.assertRaisesRegex(TypeError, "val_fn returned .*; expected a dict "
                                                   "\\{name: float\\}"):
                self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                         torch.optim.SGD(model.parameters(), 0.1), epochs=1,
                         val_fn=lambda m, bad=bad: bad)


class OnBatchEndTest(Seams):
    def test_a_global_step_count_across_a_resume_and_each_steps_loss(self):
        X, y = classes(n=100)
        d = self.tmpdir()
        seen = []

        def hook(step, loss):
            self.assertFalse(loss.requires_grad)
            self.assertEqual(loss.device.type, DEVICE.type)
            seen.append((step, loss.clone()))
        model = net()
        opt = torch.optim.SGD(model.parameters(), 0.1)
        self.fit(model, (X, y), torch.nn.CrossEntropyLoss(), opt, epochs=2, batch_size=10,
                 on_batch_end=hook, checkpoint=d, shuffle=False)
        self.fit(model, (X, y), torch.nn.CrossEntropyLoss(), opt, epochs=3, batch_size=10,
                 on_batch_end=hook, checkpoint=d, resume=True, shuffle=False)
        self.assertEqual([s for s, _ in seen], list(range(1, 31)))
        with torch.no_grad():  # step 1's loss: the first batch, before its step
            first = torch.nn.functional.cross_entropy(net()(X[:10]), y[:10])
        self.assertTrue(torch.allclose(seen[0][1], first, atol=1e-6))
        # with accumulation the count is of optimizer steps, the loss the group's
        seen.clear()
        model = net()
        self.fit(model, (X, y), torch.nn.CrossEntropyLoss(),
                 torch.optim.SGD(model.parameters(), 0.1), epochs=1, batch_size=10,
                 accumulate=4, on_batch_end=hook, shuffle=False)
        self.assertEqual([s for s, _ in seen], [1, 2, 3])
        ref = net()
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(ref(X[:40]), y[:40])
        self.assertTrue(torch.allclose(seen[0][1], want, atol=1e-6))


def auc(p, y):
    """ROC AUC written in torch: the Mann-Whitney statistic, ties given their mean rank."""
    p, y = p.reshape(-1).double(), y.reshape(-1) > 0.5
    ranks = torch.empty_like(p)
    ranks[p.argsort()] = torch.arange(1, len(p) + 1, dtype=p.dtype, device=p.device)
    _, inverse, counts = torch.unique(p, return_inverse=True, return_counts=True)
    ranks = torch.zeros(len(counts), dtype=p.dtype, device=p.device).index_add_(
        0, inverse, ranks)[inverse] / counts[inverse]
    n1 = y.sum()
    n0 = len(y) - n1
    return (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


class WholeSetTest(Seams):
    def test_hand_auc_over_10000_rows_at_batch_size_2_is_the_whole_sets(self):
        g = torch.Generator().manual_seed(0)
        X = torch.randn(10000, 4, generator=g).to(DEVICE)
        y = ((X[:, :1] + torch.randn(10000, 1, generator=g).to(DEVICE)) > 0).float()
        model = torch.nn.Linear(4, 1).to(DEVICE)
        h = self.fit(model, (X, y), torch.nn.BCEWithLogitsLoss(),
                     torch.optim.SGD(model.parameters(), 0.0), epochs=1, batch_size=2,
                     val=(X, y), val_batch_size=2, metrics={"auc": loops.whole_set(auc)},
                     shuffle=False, monitor="val_auc", mode="max")
        scores = loops.predict(model, X).reshape(-1)
        try:
            from sklearn.metrics import roc_auc_score
            want = roc_auc_score(y.cpu().numpy().reshape(-1), scores.numpy())
        except ImportError:  # a direct count of the ordered pairs instead
            s, t = scores[:2000].double(), y.cpu().reshape(-1)[:2000] > 0.5
            diff = s[t][:, None] - s[~t][None, :]
            direct = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
            self.assertAlmostEqual(auc(s, t.float()).item(), direct, places=12)
            want = auc(scores, y.cpu()).item()
        # the outputs of batches of 2 and of predict's 256 may differ in float32's last bits
        # (BLAS kernels by shape); a mean of per-batch AUCs would be off by far more
        self.assertAlmostEqual(h["auc"][0], want, delta=1e-7)
        self.assertAlmostEqual(h["val_auc"][0], want, delta=1e-7)

    def test_a_whole_set_metric_is_never_tried_on_one_batch(self):
        # fit tried every metric on the first validation batch before training: an AUC on
        # validation sorted by class (one class in that batch) was refused, "Only one class
        # present", though evaluate computes it on the whole set fine.
        g = torch.Generator().manual_seed(0)
        X = torch.randn(200, 4, generator=g).to(DEVICE)
        y = (X[:, :1] > 0).float()
        order = y.reshape(-1).argsort()  # all the zeros first

        def strict_auc(p, t):
            if t.min() == t.max():
                raise ValueError("Only one class present in y_true")
            return auc(p, t)
        model = torch.nn.Linear(4, 1).to(DEVICE)
        h = self.fit(model, (X, y), torch.nn.BCEWithLogitsLoss(),
                     torch.optim.SGD(model.parameters(), 0.1), epochs=2, batch_size=16,
                     val=(X[order], y[order]), val_batch_size=16,
                     metrics={"auc": loops.whole_set(strict_auc)})
        self.assertEqual(len(h["val_auc"]), 2)
        self.assertAlmostEqual(h["val_auc"][-1], loops.evaluate(
            model, (X, y), metrics={"auc": loops.whole_set(strict_auc)})["auc"], places=12)

    def test_a_monitor_that_names_a_rate_is_refused_without_listing_rates(self):
        model, optimizers = gan_parts()
        data = (torch.randn(20, 2).to(DEVICE), torch.zeros(20, device=DEVICE))
        with self.assertRaises(ValueError) as err:
            self.fit(model, data, None, optimizers, epochs=1, train_step=gan_step,
                     monitor="lr_G", mode="min")
        self.assertIn("monitor='lr_G' names no value of the history", str(err.exception))
        self.assertNotIn("lr_D", str(err.exception))

    def test_your_own_metric_is_a_per_sample_mean_past_128_batches(self):
        X, y = classes(n=600)
        model = net()
        top2 = lambda p, t: (p.topk(2, 1).indices == t[:, None]).any(1).double().mean()  # noqa
        logs = loops.evaluate(model, (X, y), metrics={"top2": top2}, batch_size=2)  # 300
        self.assertAlmostEqual(logs["top2"], top2(model(X).detach(), y).item(), places=12)
        # a function that is not a per-sample mean is still called batch by batch, never on
        # a chunk of batches: its epoch value is the rows' mean of its batch values
        peak = lambda p, t: p.max()  # noqa: E731
        for b in (2, 7):
            logs = loops.evaluate(model, (X, y), metrics={"peak": peak}, batch_size=b)
            with torch.no_grad():  # each batch through the model, as evaluate does
                want = sum(peak(model(X[i:i + b]), None).item() * len(X[i:i + b])
                           for i in range(0, 600, b)) / 600
            self.assertAlmostEqual(logs["peak"], want, places=12)
        with self.assertRaisesRegex(TypeError, "whole_set takes a function"):
            loops.whole_set(3)


if __name__ == "__main__":
    unittest.main()
