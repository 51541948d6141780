"""loops: a correct, fast, observable PyTorch training loop in one file.

Copy this file into your project; it needs only the standard library and torch.

    >>> import torch, loops
    >>> _ = torch.manual_seed(0)
    >>> X = torch.linspace(0, 1, 50).unsqueeze(1); y = 0.7 * X + 0.3
    >>> model = torch.nn.Linear(1, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> history = loops.fit(model, (X, y), torch.nn.MSELoss(), opt, epochs=20,
    ...                     batch_size=10, metrics={"mae": "mae"}, seed=0, verbose=0)
    >>> sorted(history)
    ['epoch', 'loss', 'lr', 'mae', 'time']
    >>> history["loss"][-1] < 1e-3
    True

Data is either a tuple ``(X, y)`` of tensors, batched here by slicing (moved to
the device once, shuffled by a seeded ``torch.Generator``), or any re-iterable
of ``(xb, yb)`` batches such as a ``DataLoader`` or a list, used as it is.

Epoch values are exact: the loss and every metric equal the value computed on
the whole set at once, whatever the batch size (sums and counts, never a mean
of batch means). For the training set that is the value over the epoch's
steps, as the model changed during the epoch. Sums stay on the device and are
read back once per epoch and at each (throttled) progress refresh, so a CUDA
run never waits on the GPU inside an epoch except to refresh the progress line.

``fit(..., checkpoint=DIR)`` writes ``best.pt``, ``last.pt`` and ``history.csv``,
each atomically (temp file + rename); ``resume=True`` continues from ``last.pt``
so that a run killed at any instant ends bit-for-bit as if never interrupted.
"""
import atexit
import contextlib
import csv
import io
import itertools
import math
import os
import random
import sys
import tempfile
import time
from typing import Callable, NamedTuple

import torch

__all__ = [
    "batches", "train_epoch", "evaluate", "predict", "fit",
    "save_checkpoint", "load_checkpoint", "setup_distributed",
    "accuracy", "binary_accuracy", "mse", "rmse", "mae", "mape", "max_error",
    "precision", "recall", "f1", "confusion_matrix",
]


# --- batching ---------------------------------------------------------------

def batches(X, y, batch_size, *, shuffle=False, drop_last=False, generator=None):
    """Yield ``(xb, yb)`` slices of two tensors; keeps the last partial batch unless drop_last."""
    _check_tensors(X, y, "X, y")
    _check_batch_size(batch_size)
    order = torch.randperm(len(X), generator=generator).to(X.device) if shuffle else None
    yield from _slices(X, y, batch_size, order, drop_last=drop_last)


def _slices(X, y, batch_size, order, *, start=0, drop_last=False, rank=0, world=1):
    """An iterator of this rank's batches, beginning after ``start`` of them.

    Unshuffled batches are views (no copy); shuffled ones one gather per tensor.
    With several ranks, each global batch of world * batch_size rows is cut in
    world equal parts and this rank takes its own; the last, short global batch
    of m rows gives each rank m // world of them and skips the m % world left
    over (fewer than world rows), so that equal local batches keep DDP's average
    of gradients equal to the mean over the global batch.

    The batches' index views are cut in one call and the gathers are mapped over
    them, so no Python code runs per batch (a generator costs about a microsecond
    a step, which shows on small models).
    """
    step = world * batch_size
    n = len(X) - len(X) % step if drop_last else len(X)
    if order is None:
        if world == 1:
            return itertools.islice(zip(X[:n].split(batch_size), y[:n].split(batch_size)),
                                    start, None)
        order = torch.arange(len(X), device=X.device)  # a rank's rows are not one block
    full = n // step
    idx = list(order[:full * step].view(full, world, batch_size)[:, rank].unbind(0))
    local = (n - full * step) // world
    if local:
        lo = full * step + rank * local
        idx.append(order[lo:lo + local])
    idx = idx[start:]
    dim0 = itertools.repeat(0)
    return zip(map(X.index_select, dim0, idx), map(y.index_select, dim0, idx))


def _check_tensors(X, y, what):
    if not (torch.is_tensor(X) and torch.is_tensor(y)):
        raise TypeError(f"{what}: expected two tensors (X, y), got "
                        f"({type(X).__name__}, {type(y).__name__})")
    if X.dim() == 0 or y.dim() == 0 or len(X) != len(y):
        raise ValueError(f"{what}: X and y must have the same first dimension, got shapes "
                         f"{tuple(X.shape)} and {tuple(y.shape)}")
    if len(X) == 0:
        raise ValueError(f"{what}: the dataset is empty (0 rows); expected at least one row")


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


class _Data:
    """Training or validation data: (X, y) tensors batched here, or a re-iterable of batches."""

    def __init__(self, data, *, what, batch_size, device, reused, rank=0, world=1, shard=False):
        _check_batch_size(batch_size)
        self.batch_size, self.device, self.rank, self.world = batch_size, device, rank, world
        self.X = self.y = self.loader = None
        self.sharded = world > 1  # each rank sees its own part: sums must be all-reduced
        if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
            _check_tensors(*data, what)
            X, y = data
            if shard and world > 1:  # evaluation: each rank takes a contiguous part of the rows
                lo, hi = len(X) * rank // world, len(X) * (rank + 1) // world
                X, y, self.world, self.rank = X[lo:hi], y[lo:hi], 1, 0
            # Moved once here, not per batch; a no-op when already on the device.
            self.X, self.y = X.to(device), y.to(device)
            step = self.world * batch_size
            last = len(self.X) % step
            self.steps = len(self.X) // step + (1 if last // self.world else 0)
            return
        if torch.is_tensor(data) or isinstance(data, tuple):
            raise TypeError(f"{what}: expected a tuple (X, y) of two tensors or an iterable of "
                            f"(xb, yb) batches, got {_describe(data)}")
        if not hasattr(data, "__iter__"):
            raise TypeError(f"{what}: expected (X, y) tensors or an iterable of (xb, yb) batches "
                            f"(a list, a DataLoader), got {type(data).__name__}")
        if reused and iter(data) is data:
            raise TypeError(f"{what}: got a one-shot iterator ({type(data).__name__}), which would "
                            "be empty after the first epoch; pass a list or a DataLoader instead")
        try:
            self.steps = len(data)
        except TypeError:
            self.steps = None  # an IterableDataset: its length shows after one pass
        if self.steps == 0:
            raise ValueError(f"{what}: the dataset is empty (0 batches); expected at least one")
        if world > 1:
            sampler = getattr(data, "sampler", None)
            self.sharded = isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
            if what == "train" and not self.sharded:
                raise ValueError(f"{what}: under torch.distributed a DataLoader needs a "
                                 "DistributedSampler, or every rank trains on every batch; pass "
                                 "DataLoader(dataset, sampler=DistributedSampler(dataset), ...)")
        self.loader = data

    def epoch(self, generator=None, shuffle=False, start=0, number=0):
        """Batches of one epoch on the device, beginning after ``start`` batches.

        The order is drawn (and skipped batches passed over) now, before the
        first batch is asked for: a resumed run restores its RNG state after this.
        """
        if self.loader is None:
            order = None
            if shuffle:
                order = torch.randperm(len(self.X), generator=generator)
                order = order.to(self.device, non_blocking=True)
            return _slices(self.X, self.y, self.batch_size, order, start=start,
                           rank=self.rank, world=self.world)
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles by epoch number
            sampler.set_epoch(number)
        it = iter(self.loader)
        for _ in range(start):  # resuming mid-epoch: the loader redraws its order, we skip ahead
            next(it)
        return ((_to(xb, self.device), _to(yb, self.device)) for xb, yb in it)


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _describe(x):
    return f"a tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else (
        f"a tuple of {len(x)} ({', '.join(type(v).__name__ for v in x)})"
        if isinstance(x, tuple) else type(x).__name__)


# --- metrics ----------------------------------------------------------------
# Each metric is a plain function (y_pred, y) -> scalar tensor over the whole set.
# For exact epoch values the loop does not average batch values: it keeps each
# metric's sufficient statistic (a sum, a maximum, or confusion counts) on the
# device and finishes it once, at the end of the epoch.

class _Stat(NamedTuple):
    stat: Callable    # (y_pred, y) -> tensor: sums (or a maximum) over the rows given
    count: Callable   # (y_pred, y) -> int from shapes alone, so no host read
    finish: Callable  # (list of floats, count) -> float
    reduce: str = "sum"
    size: int = 1     # how many numbers ``stat`` returns


def _err(p, y):
    if p.shape != y.shape:
        if p.numel() != y.numel():
            raise ValueError(f"predictions of shape {tuple(p.shape)} do not match targets of "
                             f"shape {tuple(y.shape)}")
        y = y.reshape(p.shape)  # (N,) vs (N, 1) would otherwise broadcast to (N, N)
    return p - y


def _correct(p, y):
    if p.dim() < 2 or p.shape[-1] < 2:
        raise ValueError(f"accuracy expects class scores of shape (N, C) with C >= 2, got "
                         f"{tuple(p.shape)}; for one probability per row use binary_accuracy")
    if y.dim() == p.dim():  # one-hot or probability targets
        y = y.argmax(-1)
    return p.argmax(-1) == y


def _binary(t):
    return t > 0.5


def _binary_counts(p, y):
    # [true negatives, false negatives, false positives, true positives] in one bincount.
    pred, true = _binary(p).reshape(-1), _binary(y).reshape(-1)
    if pred.numel() != true.numel():
        raise ValueError(f"predictions of shape {tuple(p.shape)} do not match targets of "
                         f"shape {tuple(y.shape)}")
    return torch.bincount(pred.long() * 2 + true.long(), minlength=4)


def _ratio(s, n):
    return s[0] / n if n else math.nan


def _rows(p, y):
    return p.shape[0]


def _numel(p, y):
    return p.numel()


def _none(p, y):
    return 0


def _safe_div(a, b):
    return a / b if b else 0.0  # scikit-learn's zero_division=0


_MAPE_EPS = 1e-7  # as Keras: |y| is clamped so that a zero target does not divide by zero
_STATS = {
    "accuracy": _Stat(lambda p, y: _correct(p, y).sum(), _rows, _ratio),
    "binary_accuracy": _Stat(lambda p, y: (_binary(p) == _binary(y).reshape(p.shape)).sum(),
                             _numel, _ratio),
    "mse": _Stat(lambda p, y: _err(p, y).square().sum(dtype=torch.float64), _numel, _ratio),
    "rmse": _Stat(lambda p, y: _err(p, y).square().sum(dtype=torch.float64), _numel,
                  lambda s, n: math.sqrt(s[0] / n)),
    "mae": _Stat(lambda p, y: _err(p, y).abs().sum(dtype=torch.float64), _numel, _ratio),
    "mape": _Stat(lambda p, y: (_err(p, y).abs() / y.reshape(p.shape).abs().clamp_min(_MAPE_EPS))
                  .sum(dtype=torch.float64) * 100, _numel, _ratio),
    "max_error": _Stat(lambda p, y: _err(p, y).abs().max(), _none, lambda s, n: s[0], "max"),
    "precision": _Stat(_binary_counts, _none, lambda c, n: _safe_div(c[3], c[3] + c[2]),
                       size=4),
    "recall": _Stat(_binary_counts, _none, lambda c, n: _safe_div(c[3], c[3] + c[1]), size=4),
    "f1": _Stat(_binary_counts, _none, lambda c, n: _safe_div(2 * c[3], 2 * c[3] + c[2] + c[1]),
                size=4),
}
_PERCENT = {"accuracy", "binary_accuracy"}  # shown as 77.3% in the progress line


def _whole(name):
    st = _STATS[name]

    def metric(y_pred, y):
        with torch.no_grad():
            s = st.stat(y_pred, y).reshape(-1).tolist()
        return torch.tensor(st.finish(s, st.count(y_pred, y)), dtype=torch.float64)
    metric.__name__ = metric.__qualname__ = name
    return metric


accuracy = _whole("accuracy")
accuracy.__doc__ = "Fraction of rows whose arg-max class equals the label (index or one-hot)."
binary_accuracy = _whole("binary_accuracy")
binary_accuracy.__doc__ = "Fraction of probabilities on the right side of 0.5."
mse = _whole("mse")
mse.__doc__ = "Mean squared error."
rmse = _whole("rmse")
rmse.__doc__ = "Root of the mean squared error (over the whole set, not a mean of roots)."
mae = _whole("mae")
mae.__doc__ = "Mean absolute error."
mape = _whole("mape")
mape.__doc__ = "Mean absolute percentage error, in percent (|y| clamped at 1e-7)."
max_error = _whole("max_error")
max_error.__doc__ = "Largest absolute error."
precision = _whole("precision")
precision.__doc__ = "Binary precision, probabilities above 0.5 counting as positive (0 if none)."
recall = _whole("recall")
recall.__doc__ = "Binary recall, probabilities above 0.5 counting as positive (0 if none)."
f1 = _whole("f1")
f1.__doc__ = "Binary F1 score, probabilities above 0.5 counting as positive (0 if none)."
_BUILTIN = {fn: name for name, fn in [(n, globals()[n]) for n in _STATS]}


def confusion_matrix(y_pred, y, num_classes):
    """Counts as a (num_classes, num_classes) int64 tensor: rows true, columns predicted."""
    with torch.no_grad():
        if y_pred.is_floating_point():
            y_pred = (y_pred.argmax(-1) if y_pred.dim() > 1 and y_pred.shape[-1] > 1
                      else _binary(y_pred).long())
        true, pred = y.reshape(-1).long(), y_pred.reshape(-1).long()
        if true.numel() != pred.numel():
            raise ValueError(f"{pred.numel()} predictions for {true.numel()} targets")
        k = num_classes
        return torch.bincount(true * k + pred, minlength=k * k).reshape(k, k).cpu()


def _metric_table(metrics):
    """{"name": fn or built-in name} -> {"name": _Stat}; TypeError/ValueError naming the key."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict {{'name': fn or 'accuracy', ...}}, got "
                        f"{type(metrics).__name__}")
    table = {}
    for key, fn in metrics.items():
        if not isinstance(key, str) or not key or key.startswith("val_") or key in (
                "epoch", "loss", "lr", "time"):
            raise ValueError(f"metrics: key {key!r} is not allowed; use a name that is not "
                             "'epoch', 'loss', 'lr', 'time' and does not start with 'val_'")
        if isinstance(fn, str):
            if fn not in _STATS:
                raise ValueError(f"metrics[{key!r}]: unknown metric {fn!r}; expected one of "
                                 f"{', '.join(_STATS)} or a function (y_pred, y) -> tensor")
            table[key] = _STATS[fn]
        elif fn in _BUILTIN:
            table[key] = _STATS[_BUILTIN[fn]]
        elif callable(fn):
            # A user metric must be a per-sample mean; its epoch value is the sample-weighted mean.
            table[key] = _Stat(lambda p, y, fn=fn: fn(p, y).detach().double() * len(p),
                               _rows, _ratio)
        else:
            raise TypeError(f"metrics[{key!r}]: expected a function (y_pred, y) -> tensor or "
                            f"the name of a built-in metric, got {type(fn).__name__}")
    return table


class _Meter:
    """Epoch sums of the loss and the metrics, on the device; read back in one transfer.

    ``add`` runs every step and only appends detached tensors to lists: no host
    read, no arithmetic. Every ``_FOLD_STEPS`` steps (or when the outputs held
    pass ``_PENDING`` values) what is pending is folded into the sums with a few
    vectorised ops on the device. Fold points depend only on the step count, so
    the sums, down to the last bit, do not depend on when anyone looked.
    ``read`` (the one place that waits for the device) adds the pending part
    without committing it, and finds the first non-finite loss.
    """
    _FOLD_STEPS = 128
    _PENDING = 1 << 22

    def __init__(self, stats, device, *, loss_is_sum=False):
        self.stats, self.device, self.loss_is_sum = stats, device, loss_is_sum
        self.rank, self.world = _world()
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=self.dtype, device=device)
        self.n = 0
        self.sums = {k: None for k in stats}
        self.counts = {k: 0 for k in stats}
        self.checked = 0  # steps whose loss is known to be finite
        self._losses, self._ns, self._outs, self._ys, self._numel = [], [], [], [], 0
        self._unchecked = []  # folded losses not yet looked at

    def add(self, loss, out, y, n):
        self._losses.append(loss)
        self._ns.append(n)
        if self.stats:
            self._outs.append(out)
            self._ys.append(y)
            self._numel += out.numel()
        if len(self._losses) == self._FOLD_STEPS or self._numel > self._PENDING:
            self._fold()

    def _pending_sums(self):
        """(losses, loss sum, rows, metric sums, metric counts) of the pending steps."""
        losses = self._pending_losses()
        loss_sum, start = 0, 0
        for size, run in _runs(self._ns):  # usually one run of equal batches, two at the end
            weight = 1 if self.loss_is_sum else size  # a batch mean stands for `size` rows
            part = losses if run == len(losses) else losses[start:start + run]
            loss_sum = loss_sum + part.sum(dtype=self.dtype) * weight
            start += run
        sums, counts = {k: None for k in self.stats}, {k: 0 for k in self.stats}
        if self.stats:
            groups = [(self._outs[0], self._ys[0])] if len(self._outs) == 1 else None
            if groups is None:
                try:
                    groups = [(torch.cat(self._outs), torch.cat(self._ys))]
                except RuntimeError:  # outputs of varying shapes (sequences): batch by batch
                    groups = list(zip(self._outs, self._ys))
            for p, y in groups:
                for k, st in self.stats.items():
                    s = st.stat(p, y).reshape(-1)
                    s = s if s.dtype == self.dtype else s.to(self.dtype)
                    sums[k] = _combine(st, sums[k], s)
                    counts[k] += st.count(p, y)
        return losses, loss_sum, sum(self._ns), sums, counts

    def _pending_losses(self):
        return torch.stack(self._losses)

    def _fold(self):
        if not self._losses:
            return
        losses, loss_sum, n, sums, counts = self._pending_sums()
        self.loss_sum, self.n = self.loss_sum + loss_sum, self.n + n
        for k, st in self.stats.items():
            self.sums[k] = _combine(st, self.sums[k], sums[k])
            self.counts[k] += counts[k]
        self._unchecked.append(losses)
        self._losses, self._ns, self._outs, self._ys, self._numel = [], [], [], [], 0

    def totals(self, *, across_ranks=False):
        """The sums so far as one flat tensor on the device, and ``finish`` to turn that
        tensor, once read back as floats, into the logs. Nothing is read here, so a
        caller can read several meters in one transfer. ``across_ranks``: the layout
        also carries the counts, for an all-reduce over the process group first."""
        loss_sum, n, sums, counts = self.loss_sum, self.n, dict(self.sums), dict(self.counts)
        if self._losses:  # counted, but not committed: fold points stay where they are
            _, p_loss, p_n, p_sums, p_counts = self._pending_sums()
            loss_sum, n = loss_sum + p_loss, n + p_n
            for k, st in self.stats.items():
                sums[k] = _combine(st, sums[k], p_sums[k])
                counts[k] += p_counts[k]
        parts = [loss_sum.reshape(1)] + [
            sums[k] if sums[k] is not None else torch.zeros(st.size, dtype=self.dtype,
                                                            device=self.device)
            for k, st in self.stats.items()]
        if across_ranks:
            parts.append(torch.tensor([n, *counts.values()], dtype=self.dtype, device=self.device))

        def finish(vals):
            total_n, total_counts = n, list(counts.values())
            if across_ranks:
                total_n, total_counts = vals[-1 - len(counts)], vals[len(vals) - len(counts):]
            if not math.isfinite(vals[0]):
                # A finite loss sum means every loss was finite: the search for the first
                # bad step happens only when it was not. Under torch.distributed only the
                # reduced sum decides, so that every rank stops at the same point.
                if across_ranks:
                    self._raise_first_bad_across_ranks()
                if self.world == 1:
                    self._raise_first_bad(vals[0])
            self.checked += sum(len(u) for u in self._unchecked)
            self._unchecked = []
            logs, i = {"loss": vals[0] / total_n if total_n else math.nan}, 1
            for (k, st), count in zip(self.stats.items(), total_counts):
                logs[k] = float(st.finish(vals[i:i + st.size], count))
                i += st.size
            return logs
        return torch.cat(parts) if len(parts) > 1 else parts[0], finish

    def max_positions(self):
        """Where ``totals`` holds maxima (max_error), which an all-reduce takes with MAX."""
        out, i = [], 1
        for st in self.stats.values():
            if st.reduce == "max":
                out += range(i, i + st.size)
            i += st.size
        return out

    def read(self):
        """Values so far as Python floats; FloatingPointError at the first non-finite loss."""
        flat, finish = self.totals()
        return finish(flat.tolist())  # the one host read

    def _local_losses(self):
        chunks = self._unchecked + ([self._pending_losses()] if self._losses else [])
        return torch.cat(chunks) if chunks else torch.zeros(0, device=self.device)

    def _raise_first_bad_across_ranks(self):
        """The same FloatingPointError on every rank: the first bad step of any rank."""
        dist = torch.distributed
        losses = self._local_losses()
        bad = (~torch.isfinite(losses)).nonzero()
        j = int(bad[0]) if len(bad) else 2**40
        key = torch.tensor([(self.checked + j) * self.world + self.rank], dtype=torch.float64,
                           device=self.device)
        dist.all_reduce(key, op=dist.ReduceOp.MIN)
        step, owner = divmod(int(key.item()), self.world)
        mine = losses[j].double().reshape(1) if owner == self.rank else torch.zeros(
            1, dtype=torch.float64, device=self.device)
        dist.all_reduce(mine)
        raise FloatingPointError(f"loss is {mine.item()} at step {step + 1} on rank {owner}")

    def _raise_first_bad(self, total):
        losses = self._local_losses()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad) == 0:  # every loss finite, their weighted sum overflowed
            raise FloatingPointError(f"the sum of the losses overflowed to {total}")
        j = int(bad[0])
        raise FloatingPointError(f"loss is {losses[j].item()} at step {self.checked + j + 1}")

    def state(self):
        """Sums and pending steps, for a mid-epoch snapshot (right after a ``read``)."""
        cpu = [t.cpu() for t in self._outs], [t.cpu() for t in self._ys]
        return {"loss_sum": self.loss_sum.cpu(), "n": self.n, "counts": dict(self.counts),
                "sums": {k: (v.cpu() if v is not None else None) for k, v in self.sums.items()},
                "losses": self._pending_losses().cpu() if self._losses else None,
                "ns": list(self._ns), "outs": cpu[0], "ys": cpu[1]}

    def load(self, state, step):
        dev = self.device
        self.loss_sum, self.n = state["loss_sum"].to(dev), state["n"]
        self.counts = dict(state["counts"])
        self.sums = {k: (v.to(dev) if v is not None else None) for k, v in state["sums"].items()}
        losses = state["losses"]
        self._losses = [] if losses is None else list(losses.to(dev))
        self._ns = list(state["ns"])
        self._outs, self._ys = [t.to(dev) for t in state["outs"]], [t.to(dev) for t in state["ys"]]
        self._numel = sum(t.numel() for t in self._outs)
        self.checked = step - len(self._losses)


def _combine(st, acc, s):
    if acc is None or s is None:
        return s if acc is None else acc
    return acc + s if st.reduce == "sum" else torch.maximum(acc, s)


def _runs(values):
    """[(value, length)] of consecutive equal values: [10, 10, 10, 4] -> [(10, 3), (4, 1)]."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


# --- train / evaluate / predict -----------------------------------------------

_TICK_SECONDS = 0.1      # progress refresh: at most ten times a second
_CPU_CHECK_SECONDS = 1.0  # silent CPU runs still look for a NaN loss this often (reads are free)


def _step(model, xb, yb, loss_fn, optimizer, scheduler, clip_grad_norm, keep_out):
    # The textbook step. A function of its own so that the graph, the output and
    # the loss die on return: nothing with a grad_fn survives into the next step.
    optimizer.zero_grad(set_to_none=True)
    out = model(xb)
    loss = loss_fn(out, yb)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; expected a "
                         "scalar (use reduction='mean', the default of torch.nn losses)")
    loss.backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (out.detach() if keep_out else None)


def _is_sum(loss_fn):
    # Losses are batch means (torch's default); a reduction="sum" loss is already a sum.
    return getattr(loss_fn, "reduction", "mean") == "sum"


def _train_loop(model, source, loss_fn, optimizer, meter, *, scheduler, clip_grad_norm,
                ticker):
    """Train over ``source``'s batches; ``ticker`` looks at the running values now and then."""
    model.train()
    step = start = meter.checked + len(meter._losses)
    next_tick, keep_out = start + 1, bool(meter.stats)  # outputs are kept only for metrics
    for xb, yb in source:
        loss, out = _step(model, xb, yb, loss_fn, optimizer, scheduler, clip_grad_norm, keep_out)
        meter.add(loss, out, yb, yb.shape[0] if torch.is_tensor(yb) else len(yb))
        step += 1
        if step == next_tick and ticker is not None:
            next_tick = ticker(step, meter)
    if step == start == 0:
        raise ValueError("the training data yielded no batches; expected at least one")
    return step


class _Ticker:
    """Looks at the running values at most every ``seconds`` without reading the clock each step.

    It predicts from the rate so far how many steps make ``seconds`` and only
    then reads the clock; each look is one host read (a CUDA sync).
    """

    def __init__(self, seconds, steps, on_tick, *, at_once=True):
        self.seconds, self.steps, self.on_tick = seconds, steps, on_tick
        self.t0, self.start = time.perf_counter(), None
        self.last = None if at_once else self.t0  # a live line shows the first step at once

    def __call__(self, step, meter):
        """Look now if it is time; return the step at which to ask again."""
        now = time.perf_counter()
        if self.start is None:
            self.start = step - 1
        if self.last is None or now - self.last >= self.seconds:
            self.last = now
            self.on_tick(step, self.steps, meter.read(), now - self.t0, step - self.start)
        rate = (step - self.start) / max(now - self.t0, 1e-9)  # steps per second so far
        return step + max(1, int(rate * (self.seconds - (now - self.last))))


def _progress_ticker(progress, seconds, steps):
    if progress is None:
        return None
    return _Ticker(seconds, steps, lambda step, total, logs, dt, done: progress(step, total, logs))


def train_epoch(model, data, loss_fn, optimizer, *, metrics=None, batch_size=32, shuffle=True,
                generator=None, device=None, scheduler=None, scheduler_interval="epoch",
                clip_grad_norm=None, progress=None):
    """Train one epoch (train mode) and return its exact loss and metrics as floats.

    ``progress(step, steps, logs)``, if given, is called at most ten times a
    second with the running values (``steps`` is None for unsized data).
    """
    device = _check_model(model, device)
    _check_training_parts(loss_fn, optimizer, scheduler, scheduler_interval, clip_grad_norm)
    stats = _metric_table(metrics)
    source = _Data(data, what="data", batch_size=batch_size, device=device, reused=False)
    meter = _Meter(stats, device, loss_is_sum=_is_sum(loss_fn))
    step_scheduler = scheduler if scheduler_interval == "step" else None
    _train_loop(model, source.epoch(generator, shuffle), loss_fn, optimizer, meter,
                scheduler=step_scheduler, clip_grad_norm=clip_grad_norm,
                ticker=_progress_ticker(progress, _TICK_SECONDS, source.steps))
    logs = meter.read()
    if scheduler is not None and scheduler_interval == "epoch":
        scheduler.step()
    return logs


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(model, data, loss_fn=None, *, metrics=None, batch_size=256, device=None):
    """Loss and metrics over a whole set, in eval mode without grad; model mode restored."""
    device = _check_model(model, device)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    stats = _metric_table(metrics)
    source = _Data(data, what="data", batch_size=batch_size, device=device, reused=False)
    return _evaluate(model, source, loss_fn, stats)


def _evaluate(model, source, loss_fn, stats):
    flat, finish, _ = _evaluate_totals(model, source, loss_fn, stats)
    return finish(flat.tolist())


def _evaluate_totals(model, source, loss_fn, stats, *, across_ranks=False):
    """Run the evaluation; return its sums on the device, the function that finishes
    them, and where they hold maxima (for an all-reduce over ranks)."""
    meter = _Meter(stats, source.device, loss_is_sum=_is_sum(loss_fn))
    zero = torch.zeros((), device=source.device)
    steps = 0
    with _eval_mode(model):
        for xb, yb in source.epoch():
            out = model(xb)
            n = yb.shape[0] if torch.is_tensor(yb) else len(yb)
            meter.add(loss_fn(out, yb) if loss_fn is not None else zero, out, yb, n)
            steps += 1
    if steps == 0 and not across_ranks:  # a rank's share of a small set may be empty
        raise ValueError("the evaluation data yielded no batches; expected at least one")
    flat, finish = meter.totals(across_ranks=across_ranks)

    def finish_logs(vals):
        logs = finish(vals)
        if loss_fn is None:
            del logs["loss"]
        return logs
    return flat, finish_logs, meter.max_positions()


def predict(model, X_or_data, *, batch_size=256, device=None):
    """Outputs for a whole set in input order, concatenated on the CPU (eval mode, no grad)."""
    device = _check_model(model, device)
    _check_batch_size(batch_size)
    data = X_or_data
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        data = data[0]
    if torch.is_tensor(data):
        if data.dim() == 0 or len(data) == 0:
            raise ValueError(f"predict: expected a non-empty tensor of inputs, got shape "
                             f"{tuple(data.shape)}")
        X = data.to(device)
        inputs = (X[i:i + batch_size] for i in range(0, len(X), batch_size))
    elif hasattr(data, "__iter__"):
        inputs = (_to(b[0] if isinstance(b, (tuple, list)) else b, device) for b in data)
    else:
        raise TypeError(f"predict: expected a tensor X, a tuple (X, y) or an iterable of "
                        f"batches, got {type(data).__name__}")
    with _eval_mode(model):
        outs = [model(xb) for xb in inputs]  # kept on the device: one transfer at the end
    if not outs:
        raise ValueError("predict: the data yielded no batches; expected at least one")
    return torch.cat(outs).cpu()


# --- checkpoints ----------------------------------------------------------------

def _unwrap(model):
    """The plain module under torch.compile and (Distributed)DataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _atomic_write(path, write):
    """Write ``path`` through a temp file beside it and os.replace: a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


_PLAIN = (bool, int, float, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(value, where):
    if torch.is_tensor(value) or isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; checkpoints hold "
                        "only tensors and plain Python values, so that load_checkpoint can load "
                        "them with weights_only=True")


def save_checkpoint(path, model, optimizer=None, **state):
    """Atomically write the model's (unwrapped) weights, the optimizer state and ``state``."""
    ckpt = {"model": _unwrap(model).state_dict(), **state}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["optimizer_type"] = type(optimizer).__name__
    _check_plain(ckpt, "checkpoint")
    _atomic_write(os.fspath(path), lambda f: torch.save(ckpt, f))


def load_checkpoint(path, model=None, optimizer=None, *, map_location="cpu"):
    """Read a checkpoint with ``weights_only=True`` and load it into model/optimizer if given."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError depending on content
        raise ValueError(f"{path} is not a plain checkpoint: it holds something other than "
                         "tensors and plain values (refused: unpickling it could run code), "
                         f"or it is damaged. torch said: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a loops checkpoint (expected a dict with 'model')")
    if model is not None:
        _check_fits(_unwrap(model), ckpt["model"], path)
    if optimizer is not None:
        saved = ckpt.get("optimizer_type")
        if "optimizer" not in ckpt:
            raise ValueError(f"{path} holds no optimizer state")
        if saved is not None and saved != type(optimizer).__name__:
            raise ValueError(f"{path} was saved with optimizer {saved}, but "
                             f"{type(optimizer).__name__} was given; use the same optimizer type")
        groups = ckpt["optimizer"]["param_groups"]
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"{path}: the saved optimizer has parameter groups of sizes {sizes}, "
                             "this one has "
                             f"{[len(g['params']) for g in optimizer.param_groups]}")
    if model is not None:
        _unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


def _check_fits(model, state, path):
    # Checked before loading: torch's load_state_dict copies the matching tensors
    # before it raises on the rest, which would leave a half-loaded model.
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} saved vs {tuple(v.shape)} here"
              for k, v in own.items() if k in state and torch.is_tensor(state[k])
              and state[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f"missing {missing[:3]}" if missing else "",
                 f"unexpected {extra[:3]}" if extra else "", "; ".join(shapes[:3])]
        raise ValueError(f"{path} was saved from a different model architecture: "
                         + "; ".join(p for p in parts if p))


def _rng_state(generator):
    """Every random state training draws on, as tensors and plain values (weights_only-safe)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")  # saved only if the program uses numpy; never imported here
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if generator is not None:
        state["batches"] = generator.get_state()
    return state


def _set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if generator is not None and "batches" in state:
        generator.set_state(state["batches"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _prepare_dir(path):
    """Create the checkpoint directory and prove it writable with a probe file."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"checkpoint directory {path!r} cannot be written: {e.strerror or e}; "
                         "expected a writable directory path") from None
    for name in os.listdir(path):  # temp files left by a run killed while writing
        if name.endswith(".tmp") and name.split(".")[0] in ("best", "last", "history"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
    return path


def _write_csv(path, history):
    keys = list(history)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for row in zip(*(history[k] for k in keys)):
        w.writerow([int(v) if k == "epoch" else repr(v) for k, v in zip(keys, row)])
    _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


# --- progress -------------------------------------------------------------------

def _num(v):
    if not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.1f}"


def _format_value(key, v, percent):
    return f"{key} {v * 100:.1f}%" if percent and math.isfinite(v) else f"{key} {_num(v)}"


def _seconds(s):
    if s < 60:
        return f"{s:.2f}s" if s < 10 else f"{s:.0f}s"
    m, s = divmod(int(s), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


def _format_summary(epoch, epochs, logs, *, percent=(), seconds=None, best=False):
    """One epoch's summary line, e.g. 'epoch 7/50  loss 0.4821  acc 77.3%  0.41s  * best'."""
    parts = [f"epoch {epoch}/{epochs}"]
    for k, v in logs.items():
        if k not in ("epoch", "lr", "time"):
            parts.append(_format_value(k, v, k.removeprefix("val_") in percent))
    if seconds is not None:
        parts.append(_seconds(seconds))
    if best:
        parts.append("* best")
    return "  ".join(parts)


def _format_progress(epoch, epochs, step, steps, logs, elapsed, done, *, percent=()):
    """The live line: 'epoch 3/50  41/77  1534 it/s  ETA 0.02s  loss 0.4821'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"epoch {epoch}/{epochs}", f"{step}/{steps if steps else '?'}",
             f"{rate:.0f} it/s" if rate >= 10 else f"{rate:.2f} it/s"]
    if steps and rate > 0:
        parts.append(f"ETA {_seconds((steps - step) / rate)}")
    parts += [_format_value(k, v, k in percent) for k, v in logs.items()]
    return "  ".join(parts)


class _Printer:
    """verbose=1 on a terminal: a live line per epoch; otherwise summary lines only (no \\r)."""

    def __init__(self, verbose, stream=None):
        self.verbose, self.stream = verbose, stream or sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = verbose == 1 and bool(isatty and isatty())
        self.width = 0

    def update(self, text):
        if self.live:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()

    def close(self):
        """End a live line that no summary will replace (an error is on its way)."""
        if self.live and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0

    def line(self, text):
        if self.verbose:
            pad = " " * max(0, self.width - len(text)) if self.live else ""
            self.stream.write(("\r" if self.live and self.width else "") + text + pad + "\n")
            self.width = 0
            self.stream.flush()


def _epoch_logs(meter, model, val_data, loss_fn, stats):
    """The epoch's training and validation values, in one host read (after an all-reduce
    of each over the process group, when there is one)."""
    world = meter.world
    flat, finish = meter.totals(across_ranks=world > 1)
    parts = [(_all_reduce(flat, meter.max_positions()) if world > 1 else flat, finish, "")]
    if val_data is not None:
        reduce = world > 1 and val_data.sharded
        flat, finish, top = _evaluate_totals(model, val_data, loss_fn, stats, across_ranks=reduce)
        parts.append((_all_reduce(flat, top) if reduce else flat, finish, "val_"))
    vals = torch.cat([p[0] for p in parts]).tolist()  # the epoch's one host read
    logs, i = {}, 0
    for flat, finish, prefix in parts:  # training first: a NaN stops before validation counts
        logs.update({prefix + k: v for k, v in finish(vals[i:i + len(flat)]).items()})
        i += len(flat)
    return logs


# --- distributed ------------------------------------------------------------------

def _world():
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(model, *, backend=None):
    """Under torchrun: join its process group and wrap the model in DistributedDataParallel.

    With ``WORLD_SIZE`` > 1 in the environment (torchrun sets it), the default
    group is initialised once (nccl when CUDA is there, else gloo), the model is
    moved to this rank's device (``cuda:LOCAL_RANK``, or the CPU) and wrapped.
    Anywhere else the model comes back as it is, so one script runs both ways.
    Returns ``(model, device)``; create the optimizer after this call.
    """
    dist = torch.distributed
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return model, _model_device(model)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        atexit.register(_leave_group)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model = model.to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, device


def _leave_group():
    # The group made by setup_distributed is taken down at exit, once every rank is
    # there: a rank that leaves while another still uses the connection can abort in
    # gloo's threads ("terminate called without an active exception").
    dist = torch.distributed
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_reduce(flat, max_positions):
    """Sum ``flat`` over the ranks, taking the maximum at ``max_positions``."""
    dist = torch.distributed
    total = flat.clone()
    dist.all_reduce(total)
    if max_positions:
        top = flat.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        total[max_positions] = top[max_positions]
    return total


def _agree(flag):
    """True on every rank if it is True on any (a stop asked for by one rank's hook)."""
    t = torch.tensor([float(flag)])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# --- fit ------------------------------------------------------------------------

def _model_device(model):
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_model(model, device):
    """The device to train on; ValueError if the model's parameters live elsewhere."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    here = _model_device(model)
    if device is None:
        return here
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; expected e.g. 'cpu' or 'cuda'") \
            from None
    same = here.type == device.type and (device.index is None or here.index is None
                                         or here.index == device.index)
    if not same:
        raise ValueError(f"the model's parameters are on {here} but device={str(device)!r}; "
                         f"move the model first (model.to({str(device)!r})) and create the "
                         "optimizer after")
    return here if device.index is None else device


def _check_training_parts(loss_fn, optimizer, scheduler, scheduler_interval, clip_grad_norm):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got "
                         f"{scheduler_interval!r}")
    if scheduler is not None and not hasattr(scheduler, "step"):
        raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float))
                                           and clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm must be a positive number or None, got "
                         f"{clip_grad_norm!r}")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _seed_all(seed):
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


class _Run:
    """What fit carries from epoch to epoch; what last.pt saves, and resume restores."""

    def __init__(self, keys):
        self.history = {k: [] for k in keys}
        self.epoch, self.best, self.best_epoch, self.wait, self.stopped = 0, None, None, 0, False


def fit(model, train, loss_fn, optimizer, *, epochs, val=None, batch_size=32, shuffle=True,
        metrics=None, monitor=None, mode="min", checkpoint=None, resume=False, patience=None,
        min_delta=0.0, restore_best=False, scheduler=None, scheduler_interval="epoch",
        clip_grad_norm=None, device=None, seed=None, verbose=1, on_epoch_end=None,
        save_every=None, val_batch_size=None):
    """Train for ``epochs`` (the total, resumed epochs included); return the history dict.

    ``save_every=s`` also refreshes ``last.pt`` at a batch boundary every s seconds
    during an epoch, so a kill loses at most s seconds of work. Tensor validation
    data is evaluated in batches of ``val_batch_size`` (default: the larger of
    ``batch_size`` and 256, as ``evaluate``; no graph is kept, so it costs less
    memory per row than training).
    """
    # 1. Every argument is checked before any work and before any file is written.
    device = _check_model(model, device)
    rank, world = _world()
    if world > 1 and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"the process group has {world} ranks but the model is not wrapped in "
                         "DistributedDataParallel, so the ranks would not share gradients; wrap "
                         "it (model, device = loops.setup_distributed(model)) before creating "
                         "the optimizer")
    if world > 1 and save_every is not None:
        raise ValueError("save_every is not supported under torch.distributed (a mid-epoch "
                         "snapshot would need every rank at the same step); checkpoints are "
                         "written at the end of each epoch")
    _check_training_parts(loss_fn, optimizer, scheduler, scheduler_interval, clip_grad_norm)
    _check_int("epochs", epochs, 0)
    stats = _metric_table(metrics)
    train_data = _Data(train, what="train", batch_size=batch_size, device=device,
                       reused=epochs > 1, rank=rank, world=world)
    if val_batch_size is None:
        val_batch_size = max(batch_size, 256) if isinstance(batch_size, int) else batch_size
    val_data = None if val is None else _Data(val, what="val", batch_size=val_batch_size,
                                              device=device, reused=epochs > 1, rank=rank,
                                              world=world, shard=True)
    keys = ["epoch", "loss", *stats]
    if val_data is not None:
        keys += ["val_loss", *("val_" + k for k in stats)]
    keys += ["lr", "time"]
    monitor = monitor or ("val_loss" if val_data is not None else "loss")
    if monitor not in keys or monitor in ("epoch", "lr", "time"):
        raise ValueError(f"monitor={monitor!r} names no value of the history; expected one of "
                         f"{', '.join(k for k in keys if k not in ('epoch', 'lr', 'time'))}"
                         + ("" if val_data is not None or not monitor.startswith("val_")
                            else " (val_ values need val=)"))
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if patience is not None:
        _check_int("patience", patience, 1)
    if not isinstance(min_delta, (int, float)) or min_delta < 0:
        raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be callable, got {type(on_epoch_end).__name__}")
    if save_every is not None and not (isinstance(save_every, (int, float)) and save_every >= 0):
        raise ValueError(f"save_every must be a number of seconds >= 0, got {save_every!r}")
    if (resume or save_every is not None) and checkpoint is None:
        raise ValueError("resume=True and save_every need checkpoint=DIR to know where last.pt is")
    last_path = best_path = None
    if checkpoint is not None:
        last_path, best_path = (os.path.join(os.fspath(checkpoint), f) for f in ("last.pt",
                                                                                 "best.pt"))
        if not resume and os.path.exists(last_path):
            raise ValueError(f"{checkpoint!r} already holds a run ({last_path}); pass resume=True "
                             "to continue it, or choose another directory (nothing is overwritten)")
    is_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if is_plateau and scheduler_interval == "step":
        raise ValueError("ReduceLROnPlateau needs the monitored value: use scheduler_interval="
                         "'epoch'")

    # 2. The run's state: fresh, or continued from last.pt.
    # Every rank draws the same permutations (one generator seed) and its own dropout
    # masks (torch's global RNG seeded with seed + rank).
    gen = torch.Generator()
    if seed is not None:
        _seed_all(seed + rank)
        gen.manual_seed(seed)
    else:  # follows torch.manual_seed, so seeding torch makes the shuffles repeatable too
        draw = torch.randint(0, 2**62, (1,)).to(device)
        if world > 1:
            torch.distributed.broadcast(draw, src=0)
        gen.manual_seed(int(draw.item()))
    if checkpoint is not None:
        _prepare_dir(checkpoint)
    run, partial = _Run(keys), None
    if resume and os.path.exists(last_path):
        partial = _resume(last_path, model, optimizer, scheduler, run, gen, keys, epochs, rank,
                          world)
    saved = f"epoch {run.epoch}" + (f" + {partial['step']} steps" if partial else "")
    printer = _Printer(verbose if rank == 0 else 0)  # one rank speaks
    percent = {k for k, st in stats.items() if any(st is _STATS[p] for p in _PERCENT)}
    percent |= {"val_" + k for k in percent}
    better = (lambda a, b: a < b - min_delta) if mode == "min" else (lambda a, b: a > b + min_delta)
    best_weights = None

    def save_last(step=0, meter=None, epoch_start=None, lr=None, elapsed=0.0):
        nonlocal saved
        rng, ranks = _rng_state(gen), None
        if world > 1:  # every rank's random state, so that each resumes its own
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, rng)
        saved = f"epoch {run.epoch}" + (f" + {step} steps" if step else "")
        if rank != 0:  # one writer
            return
        save_checkpoint(
            last_path, model, optimizer, format="loops/1", rng_ranks=ranks,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            epoch=run.epoch, step=step, meter=meter, rng=rng, rng_epoch=epoch_start,
            epoch_lr=lr, epoch_time=elapsed, history=run.history, best=run.best,
            best_epoch=run.best_epoch, wait=run.wait, stopped=run.stopped, monitor=monitor)

    # 3. The epochs.
    epoch = run.epoch + 1
    try:
        if run.stopped or run.epoch >= epochs:
            printer.line(f"nothing to do: {run.epoch} epochs done"
                         + (" (training had stopped early)" if run.stopped else ""))
            epochs = run.epoch
        for epoch in range(run.epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            start, elapsed_before = 0, 0.0
            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
            epoch_start = _rng_state(gen) if save_every is not None else None
            if partial is not None:  # continuing a mid-epoch snapshot
                start, lr, elapsed_before = partial["step"], partial["epoch_lr"], \
                    partial["epoch_time"]
                epoch_start = partial["rng_epoch"]
                _set_rng_state(epoch_start, gen)
            meter = _Meter(stats, device, loss_is_sum=_is_sum(loss_fn))
            source = train_data.epoch(gen, shuffle, start, epoch)  # draws the epoch's order
            if partial is not None:  # randomness goes on from where the snapshot left it
                meter.load(partial["meter"], start)
                _set_rng_state(partial["rng"], gen)
                partial = None
            last_save = time.perf_counter()

            def on_tick(step_now, steps, logs, elapsed, done):
                nonlocal last_save
                printer.update(_format_progress(epoch, epochs, step_now, steps, logs, elapsed,
                                                done, percent=percent))
                if save_every is not None and time.perf_counter() - last_save >= save_every:
                    save_last(step_now, meter.state(), epoch_start, lr,
                              elapsed_before + time.perf_counter() - t0)
                    last_save = time.perf_counter()

            silent_cpu = device.type == "cpu" and not printer.live and save_every is None
            seconds = _CPU_CHECK_SECONDS if silent_cpu else _TICK_SECONDS
            ticker = (_Ticker(seconds, train_data.steps, on_tick, at_once=printer.live)
                      if printer.live or save_every is not None or device.type == "cpu" else None)
            try:
                _train_loop(model, source, loss_fn, optimizer, meter,
                            scheduler=scheduler if scheduler_interval == "step" else None,
                            clip_grad_norm=clip_grad_norm, ticker=ticker)
                logs = {"epoch": epoch, **_epoch_logs(meter, model, val_data, loss_fn, stats)}
            except FloatingPointError as e:
                printer.close()
                raise FloatingPointError(
                    f"epoch {epoch}: {e}; training stopped, and best.pt/last.pt keep the last "
                    "good state. Lower the learning rate, clip gradients (clip_grad_norm=1.0) "
                    "or look for NaN/inf in the data") from None
            logs["lr"], logs["time"] = lr, elapsed_before + time.perf_counter() - t0
            value = logs[monitor]
            if scheduler is not None and scheduler_interval == "epoch":
                scheduler.step(value) if is_plateau else scheduler.step()
            for k in keys:
                run.history[k].append(float(logs[k]))
            run.epoch = epoch
            improved = math.isfinite(value) and (run.best is None or better(value, run.best))
            if improved:
                run.best, run.best_epoch, run.wait = value, epoch, 0
                if restore_best:
                    best_weights = {k: v.detach().clone()
                                    for k, v in _unwrap(model).state_dict().items()}
            else:
                run.wait += 1
            run.stopped = patience is not None and run.wait >= patience
            if checkpoint is not None:  # saved before it is announced, or a hook runs
                if improved and rank == 0:
                    save_checkpoint(best_path, model, format="loops/1", epoch=epoch,
                                    monitor=monitor, value=value)
                save_last()
                if rank == 0:
                    _write_csv(os.path.join(os.fspath(checkpoint), "history.csv"), run.history)
            if printer.verbose:
                printer.line(_format_summary(epoch, epochs, logs, percent=percent,
                                             seconds=logs["time"], best=improved))
            stop = on_epoch_end is not None and on_epoch_end(epoch, dict(logs)) is True
            if stop if world == 1 else _agree(stop):  # every rank stops, or none
                run.stopped = True
                if checkpoint is not None:
                    save_last()  # so that a resume does not train on past the hook's stop
            if run.stopped:
                if patience is not None and run.wait >= patience:
                    printer.line(f"early stop: {monitor} did not improve for {patience} epochs "
                                 f"(best {_num(run.best)} at epoch {run.best_epoch})")
                break
    except KeyboardInterrupt:
        # Nothing is written here: the weights are from the middle of an unsaved
        # stretch, and last.pt already holds the last consistent point.
        printer.line(f"interrupted during epoch {epoch}: returning the history of {run.epoch} "
                     "completed epochs" + (f"; last.pt holds {saved}" if last_path else ""))
        return run.history
    if restore_best and run.best_epoch is not None:
        if best_weights is not None:
            _unwrap(model).load_state_dict(best_weights)
        elif best_path is not None and os.path.exists(best_path):
            load_checkpoint(best_path, model)
    return run.history


def _resume(path, model, optimizer, scheduler, run, gen, keys, epochs, rank=0, world=1):
    """Restore the run from last.pt; the partial epoch's state if it was a mid-epoch snapshot."""
    ck = load_checkpoint(path, model, optimizer)
    if ck.get("format") != "loops/1":
        raise ValueError(f"{path} was not written by fit (no 'format': 'loops/1'); cannot resume")
    if list(ck["history"]) != keys:
        raise ValueError(f"{path} recorded {list(ck['history'])}, this run records {keys}; "
                         "resume with the same metrics and val")
    done = ck["epoch"] + (1 if ck["step"] else 0)
    if epochs < ck["epoch"] or (ck["step"] and epochs < done):
        raise ValueError(f"{path} already trained {ck['epoch']} epochs"
                         + (f" and part of epoch {done}" if ck["step"] else "")
                         + f"; epochs={epochs} is the total, counting those: pass epochs >= "
                           f"{done}")
    if (ck["scheduler"] is None) != (scheduler is None):
        raise ValueError(f"{path} was saved {'with' if ck['scheduler'] else 'without'} a "
                         "scheduler; resume with the same setup")
    if scheduler is not None:
        scheduler.load_state_dict(ck["scheduler"])
    run.history = {k: list(v) for k, v in ck["history"].items()}
    run.epoch, run.best, run.best_epoch = ck["epoch"], ck["best"], ck["best_epoch"]
    run.wait, run.stopped = ck["wait"], ck["stopped"]
    ranks = ck.get("rng_ranks")
    _set_rng_state(ranks[rank] if ranks and len(ranks) == world else ck["rng"], gen)
    return ck if ck["step"] else None
