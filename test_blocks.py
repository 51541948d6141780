"""loops.py with its optional blocks deleted: each block alone, and all of them.

Each copy is written to a temporary directory and run in a fresh interpreter beside
the full loops.py: the core (fit with metrics, checkpoints, resume, patience and
restore_best; evaluate; predict) must give the full file's numbers bit for bit, and
asking the copy for a deleted feature must be an error that names its block (by
argument, attribute or `from loops import`).
"""
import ast
import builtins
import os
import re
import subprocess
import symtable
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = ("mid-epoch snapshots", "more metrics", "plot hints", "mixed precision", "distributed",
          "lr_find", "checkpoint guards", "argument checks")


def without(source, names):
    """``source`` without the lines from '# --- optional: NAME' to '# --- end of NAME'
    (both included) of each block named."""
    out, inside = [], None
    for line in source.splitlines(keepends=True):
        start = re.match(r"# --- optional: (.+?) -*$", line)
        if inside is None and start and start.group(1) in names:
            inside = start.group(1)
        if inside is None:
            out.append(line)
        elif line.startswith(f"# --- end of {inside} "):
            inside = None
    if inside is not None:
        raise AssertionError(f"block {inside!r} has no end line")
    return "".join(out)


# Run by each copy, with the copy first on sys.path as ``loops`` and the full file
# imported as ``full``; DELETED names the blocks the copy lacks.
CHECK = r'''
import importlib.util, os, sys, tempfile, unittest.mock
import torch
import loops
spec = importlib.util.spec_from_file_location("full", os.path.join(sys.argv[1], "loops.py"))
full = importlib.util.module_from_spec(spec); spec.loader.exec_module(full)
DELETED = sys.argv[2].split(",")
assert os.path.dirname(loops.__file__) != sys.argv[1], "the copy was not the one imported"

def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    return X, (X[:, :1] - X[:, 1:2] + 0.3 * torch.randn(n, 1, generator=g) > 0).float()

train, val = data(120, 1), data(50, 2)

def share(p, y):  # a metric of the user's: a per-sample mean
    return ((p > 0) == (y > 0.5)).float().mean()

def spread(p, y):  # a metric of the whole set
    return p.std()

METRICS = {"acc": "binary_accuracy", "mae": "mae", "mine": share, "spread": None}
if "more metrics" not in DELETED:
    METRICS["f1"] = "f1"

def run(module, directory, epochs, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    metrics = kw.pop("metrics", {**METRICS, "spread": module.whole_set(spread)})
    h = module.fit(model, train, torch.nn.BCEWithLogitsLoss(), opt, epochs=epochs, val=val,
                   batch_size=16, metrics=metrics,
                   checkpoint=directory, patience=3, restore_best=True, seed=0, verbose=0,
                   scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), clip_grad_norm=1.0,
                   **kw)
    return h, model

def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

tmp = tempfile.mkdtemp()
h_full, m_full = run(full, os.path.join(tmp, "full"), 8)
h_copy, m_copy = run(loops, os.path.join(tmp, "copy"), 8)
drop = lambda h: {k: v for k, v in h.items() if k != "time"}
assert drop(h_copy) == drop(h_full), (h_copy, h_full)
assert len(h_full["epoch"]) > 3 and h_full["lr"][0] != h_full["lr"][-1]  # trained, stepped
assert same(m_copy, m_full), "restore_best gave other weights"
# resume: 3 epochs, then the same call continued to 8, as one uninterrupted run
run(loops, os.path.join(tmp, "resumed"), 3)
h_res, m_res = run(loops, os.path.join(tmp, "resumed"), 8, resume=True)
assert drop(h_res) == drop(h_full), (h_res, h_full)
assert same(m_res, m_full)
best = loops.load_checkpoint(os.path.join(tmp, "copy", "best.pt"))
assert best["epoch"] == full.load_checkpoint(os.path.join(tmp, "full", "best.pt"))["epoch"]
loss_fn = torch.nn.BCEWithLogitsLoss()
e_copy = loops.evaluate(m_copy, val, loss_fn, metrics={"acc": "binary_accuracy"})
assert e_copy == full.evaluate(m_full, val, loss_fn, metrics={"acc": "binary_accuracy"})
assert torch.equal(loops.predict(m_copy, val[0]), full.predict(m_full, val[0]))

def refused(call, error, block):
    try:
        call()
    except error as e:
        assert f"'{block}'" in str(e), str(e)
        return
    raise AssertionError(f"no {error.__name__} naming {block!r}")

def imported(name, block):  # `from loops import name` names the block too
    try:
        exec(f"from loops import {name}", {})
    except ImportError as e:
        assert f"'{block}'" in str(e), str(e)
        return
    raise AssertionError(f"from loops import {name} was not refused")

if "mixed precision" in DELETED:
    refused(lambda: run(loops, None, 1, precision="bf16"), ValueError, "mixed precision")
    refused(lambda: loops.evaluate(m_copy, val, loss_fn, precision="fp16"), ValueError,
            "mixed precision")
if "lr_find" in DELETED:
    refused(lambda: loops.lr_find, AttributeError, "lr_find")
    imported("lr_find", "lr_find")
    assert "lr_find" not in loops.__all__ and not hasattr(loops, "lr_find")
if "more metrics" in DELETED:
    refused(lambda: loops.f1, AttributeError, "more metrics")
    imported("confusion_matrix", "more metrics")
    refused(lambda: run(loops, None, 1, metrics={"f1": "f1"}), ValueError, "more metrics")
if "mid-epoch snapshots" in DELETED:
    refused(lambda: run(loops, os.path.join(tmp, "snap"), 1, save_every=0), ValueError,
            "mid-epoch snapshots")
    class Stop(Exception):
        pass
    def stop(step, loss):
        if step == 10:
            raise Stop
    try:  # the full file leaves last.pt inside epoch 2; the copy says what it needs
        with unittest.mock.patch.object(full, "_TICK_SECONDS", 0):
            run(full, os.path.join(tmp, "mid"), 3, save_every=0, on_batch_end=stop)
    except Stop:
        pass
    assert full.load_checkpoint(os.path.join(tmp, "mid", "last.pt"))["step"] > 0
    refused(lambda: run(loops, os.path.join(tmp, "mid"), 3, resume=True), ValueError,
            "mid-epoch snapshots")
if "plot hints" in DELETED:
    assert type(h_copy) is dict and not hasattr(h_copy, "better")
    assert "run.json" not in os.listdir(os.path.join(tmp, "copy"))
else:
    assert h_copy.better == h_full.better and h_copy.better["val_acc"] == "max"
if "checkpoint guards" in DELETED:
    assert ".lock" not in os.listdir(os.path.join(tmp, "copy"))
    try:  # the core still never trains over a saved run
        run(loops, os.path.join(tmp, "copy"), 9)
    except ValueError as e:
        assert "already holds a run" in str(e), e
    else:
        raise AssertionError("a fresh run trained over a saved one")
if "argument checks" in DELETED:  # bad input meets torch's (or Python's) own errors
    for bad in ({"batch_size": 0}, {"metrics": {"acc": "accuracyy"}}):
        try:
            run(loops, None, 1, **bad)
        except Exception as e:
            assert "must be an int >= 1" not in str(e) and "unknown metric" not in str(e), e
        else:
            raise AssertionError(f"{bad} trained")
if "distributed" in DELETED:
    refused(lambda: loops.setup_distributed, AttributeError, "distributed")
    with unittest.mock.patch("torch.distributed.is_initialized", return_value=True), \
            unittest.mock.patch("torch.distributed.get_world_size", return_value=2):
        refused(lambda: run(loops, None, 1), ValueError, "distributed")
import doctest  # the docstrings' examples hold in the copy too
assert doctest.testmod(loops).failed == 0, "a doctest failed in the copy"
print("core ok without", DELETED)
'''


class DeletedBlocksTest(unittest.TestCase):
    def test_the_core_works_without_each_block_and_without_all_of_them(self):
        with open(os.path.join(HERE, "loops.py")) as f:
            source = f.read()
        for name in BLOCKS:
            self.assertEqual(len(re.findall(rf"^# --- optional: {name} -*$", source, re.M)), 1)
            self.assertEqual(len(re.findall(rf"^# --- end of {name} -*$", source, re.M)), 1)
        cases = [(name,) for name in BLOCKS] + [BLOCKS]
        runs = []
        for names in cases:
            d = tempfile.TemporaryDirectory()
            self.addCleanup(d.cleanup)
            copy = without(source, names)
            self.assertLess(len(copy), len(source))
            with open(os.path.join(d.name, "loops.py"), "w") as f:
                f.write(copy)
            env = {**os.environ, "PYTHONPATH": d.name, "OMP_NUM_THREADS": "1"}
            runs.append((names, d.name, subprocess.Popen(
                [sys.executable, "-c", CHECK, HERE, ",".join(names)], cwd=d.name, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        done = [(names, where, p, *p.communicate(timeout=600)) for names, where, p in runs]
        for names, _, p, out, err in done:
            self.assertEqual(p.returncode, 0, f"without {names}:\n{err[-3000:]}")
            self.assertIn("core ok", out)

    def test_the_core_is_what_the_budget_says(self):
        with open(os.path.join(HERE, "loops.py")) as f:
            source = f.read()
        core = without(source, BLOCKS)
        self.assertLessEqual(len(core.splitlines()), 1800)
        self.assertEqual(source.count(".backward("), 1)  # one step path for every kind of step

    def test_the_readme_counts_the_lines_as_they_are(self):
        # README's "Changing the loop" gives each block's lines and the file's: kept true.
        with open(os.path.join(HERE, "loops.py")) as f:
            source = f.read()
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        lines = len(source.splitlines())
        for name in BLOCKS:
            said = re.search(rf"^\| `{re.escape(name)}` \| (\d+) \|", readme, re.M)
            self.assertIsNotNone(said, f"no row for {name!r}")
            self.assertEqual(int(said.group(1)), lines - len(without(source, (name,)).splitlines()),
                             name)
        said = re.search(r"`loops.py` is ([\d,]+)\s+lines; the core, with every block "
                         r"deleted, ([\d,]+)", readme)
        self.assertEqual([int(n.replace(",", "")) for n in said.groups()],
                         [lines, len(without(source, BLOCKS).splitlines())])

    def test_every_name_a_copy_uses_is_defined_in_it(self):
        # A block that uses a module or a helper of another block (warnings, say) would fail
        # in a copy without that block, on a path the runs above may not take: every global
        # name each function reads must be defined in the copy (or be a builtin).
        with open(os.path.join(HERE, "loops.py")) as f:
            source = f.read()
        for names in [()] + [(name,) for name in BLOCKS] + [BLOCKS]:
            copy = without(source, names)
            tree = ast.parse(copy)
            defined = set(dir(builtins)) | {"__file__", "__name__"}
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                for t in ast.walk(node) if isinstance(node, (ast.Assign, ast.AugAssign)) else ():
                    if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store):
                        defined.add(t.id)
            used = set()

            def visit(table):
                for sym in table.get_symbols():
                    if sym.is_global() and sym.is_referenced():
                        used.add(sym.get_name())
                for child in table.get_children():
                    visit(child)
            visit(symtable.symtable(copy, "loops.py", "exec"))
            self.assertEqual(sorted(used - defined), [], f"undefined without {names}")

    def test_without_removes_exactly_the_block(self):
        text = ("a\n# --- optional: x ---\nb\n# --- end of x ---\nc\n"
                "# --- optional: y ---\nd\n# --- end of y ---\n")
        self.assertEqual(without(text, ("x",)), "a\nc\n# --- optional: y ---\nd\n"
                                                "# --- end of y ---\n")
        self.assertEqual(without(text, ("x", "y")), "a\nc\n")
        with self.assertRaises(AssertionError):
            without("# --- optional: x ---\nb\n", ("x",))


if __name__ == "__main__":
    unittest.main()
