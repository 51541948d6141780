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
    ['best_epoch', 'epoch', 'loss', 'lr', 'mae', 'time']
    >>> history["loss"][-1] < 1e-3
    True

Data is ``(X, y)`` tensors, batched here, or any re-iterable of batches (a DataLoader).
Epoch values are exact (sums and counts on the device, read once an epoch and at each
progress refresh). ``checkpoint=DIR`` writes best.pt, last.pt and history.csv atomically;
``resume=True`` goes on bit for bit.

The map, top-down. To change the loop, copy ``fit``: it plans the run, then per epoch
trains, evaluates, records, saves, reports and decides whether to stop.

    entry points     fit, train_epoch, evaluate, predict, batches, save/load_checkpoint
    the step         _Stepper.step and _backward, the one backward of every kind of step;
                     _forward_loss, where a batch meets the model and the loss
    one epoch        _train_loop (no ``.item()`` there), _epoch_logs, _evaluate_pass, _Watch
    exact sums       _Meter: the loss and the metrics' statistics, summed on the device
    the run's record _Record: history, best value, patience, why it stopped
    checkpoints      _Store: best.pt and last.pt (saved and resumed side by side)
    processes, data  _OneProcess; _TensorSource and _LoaderSource
    progress         pure formatters, and the _Printer that writes them
    metrics          accuracy, binary_accuracy, mse, rmse, mae, whole_set
    building a run   _plan: what fit runs on
    optional blocks  argument checks, checkpoint guards, mid-epoch snapshots, more metrics,
                     plot hints, mixed precision, distributed, lr_find: each from
                     ``# --- optional: NAME`` to ``# --- end of NAME``. Delete any, or all:
                     the rest gives the same numbers, and refuses a deleted feature by name.
"""
import builtins
import contextlib
import csv
import functools
import io
import itertools
import math
import opcode
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Callable, NamedTuple

import torch

__all__ = [  # the optional blocks add their own names
    "batches", "train_epoch", "evaluate", "predict", "fit", "save_checkpoint",
    "load_checkpoint", "model_device", "accuracy", "binary_accuracy", "mse", "rmse", "mae",
    "whole_set",
]


# --- entry points -------------------------------------------------------------

def fit(model, train, loss_fn, optimizer, *, epochs, val=None, batch_size=32, shuffle=True,
        metrics=None, monitor=None, mode="auto", checkpoint=None, resume=False, patience=None,
        min_delta=0.0, restore_best=False, scheduler=None, scheduler_interval="epoch",
        clip_grad_norm=None, device=None, seed=None, verbose=1, on_epoch_end=None,
        save_every=None, val_batch_size=None, drop_last=False, precision=None, accumulate=1,
        on_batch_end=None, forward=None, train_step=None, val_fn=None):
    """Train for ``epochs`` (the total, resumed epochs included); return the history dict.
    The seams (forward, train_step, val_fn, on_batch_end, on_epoch_end): README."""
    args = locals()  # fit's arguments, once: to the checks, then to the plan
    world = _world()  # one process, or under torchrun the distributed block's _Ranks
    world.check(model, optimizer, save_every, clip_grad_norm, precision)
    _maybe("_check_fit", **args)  # every argument, before any work (argument checks)
    plan = _plan(world, **args)
    device = plan.device

    # Setup: the order's generator (and seeds), the step, the record, the files, the printer.
    gen = _shuffle_generator(seed, device, world,
                             drawn=shuffle and isinstance(plan.train, _TensorSource))
    stepper = _Stepper(optimizer, scheduler=scheduler, interval=scheduler_interval,
                       clip_grad_norm=clip_grad_norm, precision=precision, forward=forward,
                       accumulate=accumulate, device=device, loss_fn=loss_fn, world=world,
                       train_step=train_step)
    record = _Record(plan.keys, monitor=plan.monitor, mode=plan.mode, min_delta=min_delta,
                     patience=patience, keep_best=restore_best, better=plan.better,
                     later=train_step is not None or val_fn is not None)
    store = _Store(checkpoint, model, optimizer, scheduler, gen, world=world, resume=resume,
                   scaler=stepper.scaler, loaders=plan.train.generators,
                   settings=plan.settings)
    printer = _Printer(verbose if world.writer else 0, epochs, plan.percent)  # one rank speaks
    # How often to look inside an epoch: ten times a second for a live line or snapshots;
    # once a second on a silent CPU run (to stop at a NaN); never on a GPU (a read waits).
    look_seconds = _TICK_SECONDS if printer.live or save_every is not None else (
        _CPU_CHECK_SECONDS if device.type == "cpu" else None)

    epoch = 1
    try:
        snapshot = _resume(store, record, epochs, plan, printer, on_epoch_end) if resume else None
        first = epoch = record.epoch + 1
        for epoch in record.epochs_to_run(epochs):
            # Train: the epoch's batches and sums (or where a mid-epoch snapshot stopped),
            # then a step on each batch, looked at now and then.
            meter = _Meter(plan.train_stats, device, None if train_step else loss_fn,
                           sharded=plan.train.sharded, tried=epoch > first,
                           first_step=record.steps, monitor=None if val_fn else plan.monitor)
            start, batches = _begin_epoch(epoch, plan, gen, _rates(optimizer), meter,
                                          shuffle=shuffle, snapshot=snapshot)
            snapshot = None  # only the first epoch of a resumed run continues a snapshot
            watch = None if look_seconds is None else _Watch(
                look_seconds, plan.train.steps, functools.partial(printer.progress, epoch),
                at_once=printer.live, also=plan.snapshots and plan.snapshots(store, record, start))
            with _nan_stops_training(epoch, printer, model, store):
                _train_loop(model, batches, stepper, meter, watch, on_batch_end, record.steps)
                stepper.check_epoch()
                # Evaluate: training and validation values, in one host read; then val_fn.
                logs = {"epoch": epoch, **_epoch_logs(meter, model, plan, stepper.seam, val_fn)}
            logs.update(start.lr, time=start.elapsed())
            record.steps += stepper.optimizer_steps(meter.steps)
            # Record: the history, the best value, patience; the scheduler's epoch step.
            improved = record.add(logs, model)
            stepper.end_epoch(logs[plan.monitor])
            # Save before the epoch is announced or the hook runs; then report it.
            store.save_epoch(record, improved)
            printer.summary(epoch, logs, best=improved)
            # Stop? Patience ran out, or the hook asked (saved, so a resume stops too).
            _ask_hook(on_epoch_end, epoch, logs, record, store, world)
            if record.stopped:
                printer.line(record.why_stopped())
                break
    except KeyboardInterrupt as stop:
        # Nothing is written here: the weights are from the middle of an unsaved
        # stretch, and last.pt already holds the last consistent point.
        return _interrupted(stop, epoch, record, store, printer, world)
    finally:
        store.release()
    if restore_best:
        record.restore_best(model, store.best_path)
    return record.result()


def train_epoch(model, data, loss_fn, optimizer, *, metrics=None, batch_size=32, shuffle=True,
                generator=None, device=None, scheduler=None, scheduler_interval="epoch",
                clip_grad_norm=None, progress=None, drop_last=False, precision=None,
                accumulate=1, forward=None):
    """Train one epoch and return its exact loss and metrics; the options as in fit.
    ``progress(step, steps, logs)`` sees the running values at most ten times a second."""
    _maybe("_check_train_epoch", **locals())
    device = model_device(model)
    source = _source(data, what="data", batch_size=batch_size, device=device,
                     drop_last=drop_last, pairs=forward is None, accumulate=accumulate)
    stepper = _Stepper(optimizer, scheduler=scheduler, interval=scheduler_interval,
                       clip_grad_norm=clip_grad_norm, precision=precision,
                       accumulate=accumulate, device=device, loss_fn=loss_fn, forward=forward)
    meter = _Meter(_metric_table(metrics, loss_fn), device, loss_fn)
    watch = None if progress is None else _Watch(
        _TICK_SECONDS, source.steps, lambda step, steps, logs, *_: progress(step, steps, logs))
    _train_loop(model, source.epoch(generator=generator, shuffle=shuffle), stepper, meter, watch)
    stepper.check_epoch()
    logs = _read([meter])[0]
    stepper.end_epoch(logs["loss"])
    return logs


def evaluate(model, data, loss_fn=None, *, metrics=None, batch_size=256, device=None,
             precision=None, forward=None):
    """Loss and metrics over a whole set, in eval mode without grad; model mode restored."""
    _maybe("_check_evaluate", **locals())
    device = model_device(model)
    source = _source(data, what="data", batch_size=batch_size, device=device,
                     pairs=forward is None)
    seam = _seam(loss_fn, forward, precision, device)
    return _read([_evaluate_pass(model, source, seam, _metric_table(metrics, loss_fn))])[0]


def predict(model, X_or_data, *, batch_size=256, device=None, precision=None, forward=None):
    """Outputs for a whole set in input order, on the CPU in fp32 (eval mode, no grad): the
    model's on each batch's inputs, or the ``y_pred`` that ``forward(model, batch)`` gives."""
    _maybe("_check_predict", **locals())
    device, data = model_device(model), X_or_data
    if forward is None and _is_pair(data):
        data = data[0]
    source = _source(data, what="predict", batch_size=batch_size, device=device, pairs=False)
    seam = _seam(None, forward or (  # else a batch's inputs
        lambda m, b: (m(b[0] if isinstance(b, (tuple, list)) else b), None)), precision, device)
    with _eval_mode(model):
        outs = [seam(model, batch)[1] for batch in source.epoch()]
    _maybe("_check_predicted", outs, forward)
    return _fp32(torch.cat(outs)).cpu()  # on the device until here: one transfer at the end


def batches(X, y, batch_size, *, shuffle=False, drop_last=False, generator=None):
    """Yield ``(xb, yb)`` slices of two tensors; keeps the last partial batch unless drop_last."""
    _maybe("_check_data", (X, y), "X, y", batch_size)
    order = torch.randperm(len(X), generator=generator).to(X.device) if shuffle else None
    yield from _slices(X, y, batch_size, order,
                       rows=len(X) - len(X) % batch_size if drop_last else None)


def save_checkpoint(path, model, optimizer=None, **state):
    """Atomically write the model's (unwrapped) weights, the optimizer state and ``state``.
    A sharded model's (setup_distributed(shard=True)): every rank calls, rank 0 writes."""
    if _is_sharded(model):
        return _block("distributed", "_save_sharded", "sharding")(path, model, optimizer, state)
    ckpt = {"model": _unwrap(model).state_dict(), **state}
    if optimizer is not None:  # a dict of optimizers is saved as a dict of their states
        ckpt["optimizer"] = _state_of(optimizer)
        ckpt["optimizer_type"] = ({k: type(o).__name__ for k, o in optimizer.items()}
                                  if isinstance(optimizer, dict) else type(optimizer).__name__)
    _maybe("_check_plain", ckpt, "checkpoint")
    _maybe("_seal", ckpt)  # its checksum, verified as it is read (checkpoint guards)
    _atomic_write(os.fspath(path), lambda f: torch.save(ckpt, f))


def load_checkpoint(path, model=None, optimizer=None, *, map_location="cpu"):
    """Read a checkpoint with ``weights_only=True`` and load it into model/optimizer if given."""
    path = os.fspath(path)
    ckpt = _read_checkpoint(path, map_location=map_location)
    _load_into(ckpt, path, model, optimizer)
    return ckpt


def model_device(model):
    """The device of the model's parameters (or buffers; the CPU for a model with neither)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


# --- the step -----------------------------------------------------------------

class _Stepper:
    """The optimizer's side of training. Every kind of step (plain, accumulated, fp16, DDP's
    no_sync) goes through ``step`` and ``_backward``: an edit there reaches them all."""

    def __init__(self, optimizer, *, scheduler=None, interval="epoch", clip_grad_norm=None,
                 precision=None, accumulate=1, device=None, loss_fn=None, world=None,
                 forward=None, train_step=None):
        self.optimizer, self.interval = optimizer, interval
        self.clip_grad_norm, self.accumulate = clip_grad_norm, accumulate
        self.schedulers = _named(scheduler)  # one, or a dict keyed like the optimizers
        self.per_step = list(self.schedulers.values()) if interval == "step" else []
        self.seam = _seam(loss_fn, forward, precision, device)
        self.scaler = None if precision != "fp16" else _block(  # fp16's GradScaler
            "mixed precision", "_Scaler", "precision='fp16'")(device.type)
        self.weigh = _target_weights(loss_fn) if forward is None else None  # for the shares
        self.summed = getattr(loss_fn, "reduction", "mean") == "sum"  # sums add up as they are
        self.world = world or _ONE_PROCESS
        self.train_step, self.shares = train_step, [None]
        if train_step is not None:
            self.step = self._own_step  # the user's step, in place of loops' own

    def step(self, model, group):
        """One optimizer step on a group of batches (one, or ``accumulate``), its gradients
        all-reduced once (DDP: on the last batch); [(loss, y_pred, y)] of each, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        if len(group) == 1:
            self.shares, done = (None,), [self._backward(model, group[0])]
        else:
            self.shares, no_sync, done = self._shares(group), self.world.no_sync(model), []
            for i, (batch, share) in enumerate(zip(group, self.shares)):
                with no_sync() if no_sync is not None and i < len(group) - 1 else _NO_CONTEXT:
                    done.append(self._backward(model, batch, share))
        self._update(model)  # detached only now: fewer handoffs of the GIL as the graph goes
        return [(loss.detach(), y_pred.detach(), y) for loss, y_pred, y in done]

    def _backward(self, model, batch, share=None):
        """Forward, loss, and the backward of the loss times its ``share`` of the group (None:
        all of it): the file's one backward, which frees the graph before the next batch."""
        loss, y_pred, y = self.seam(model, batch)
        if loss is None:  # no loss_fn, and forward returned no loss of the model's own
            _maybe("_refuse_loss", loss)
        scaled = loss if share is None else loss * share
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        return loss, y_pred, y

    def _own_step(self, model, group):
        """train_step's step: its values (batch means), summed in place of the loss."""
        batch, = group
        values = self.train_step(model, batch, self.optimizer)
        for scheduler in self.per_step:
            scheduler.step()
        try:
            values = {k: v.detach() for k, v in values.items()}
        except AttributeError:  # not a dict of tensors
            _maybe("_check_step_values", values)
            raise
        return [(None, None, batch, values)]

    def loss(self, done):
        """The step's loss from its batches', by their shares (train_step's: its values)."""
        if self.train_step is not None:
            return done[0][3]
        if len(done) == 1:
            return done[0][0]
        return sum(d[0] if w is None else d[0] * w for d, w in zip(done, self.shares))

    def optimizer_steps(self, batches):
        return -(-batches // self.accumulate)

    def groups(self, batches):
        """The batches in groups of ``accumulate``, a step each; never across two epochs."""
        if self.accumulate == 1:
            return zip(batches)  # (batch,) tuples
        it = iter(batches)
        return iter(lambda: list(itertools.islice(it, self.accumulate)), [])

    def _shares(self, group):
        """Each batch's share of the group's rows (or targets' weights, CrossEntropyLoss's),
        so that k batches of b step as one of k * b; None for a reduction="sum" loss."""
        if self.summed:
            return [None] * len(group)
        if self.weigh is not None and all(isinstance(yb, torch.Tensor) for _, yb in group):
            w = torch.cat([self.weigh(yb.unsqueeze(0)) for _, yb in group]).float()
            return list((w / w.sum().clamp_min(torch.finfo(w.dtype).tiny)).unbind())
        rows = [b[1].shape[0] if type(b) is tuple and isinstance(b[1], torch.Tensor)
                else _batch_rows(b) for b in group]  # (X, y) pairs without a call each
        total = sum(rows)
        return [n / total for n in rows]

    def _update(self, model):
        if self.scaler is not None:  # fp16: unscale, clip, step (or skip), update the scale
            self.scaler.update_weights(self.optimizer, model.parameters(), self.clip_grad_norm)
        else:
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
            self.optimizer.step()
        for scheduler in self.per_step:
            scheduler.step()

    def check_epoch(self):
        """At the end of an epoch: fp16 that skipped every step says so (see _Scaler)."""
        if self.scaler is not None:
            self.scaler.check_epoch()

    def end_epoch(self, value):
        """The once-an-epoch scheduler step; ReduceLROnPlateau receives ``value``."""
        for scheduler in self.schedulers.values() if self.interval == "epoch" else ():
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(value)
            else:
                scheduler.step()


_NO_CONTEXT = contextlib.nullcontext()  # reusable: entered at every step that syncs


def _forward_loss(model, batch, loss_fn, cast=None, forward=None):
    """``(loss, y_pred, y)`` of a batch, under autocast if ``cast``: the one place where a
    batch meets the model and the loss (the model's own, if ``forward`` returns it third)."""
    if cast is not None:
        with cast():
            return _forward_loss(model, batch, loss_fn, None, forward)
    loss = None
    if forward is None:
        xb, y = batch
        y_pred = model(xb)
    else:
        out = forward(model, batch)
        if type(out) not in (tuple, list) or len(out) not in (2, 3):
            _maybe("_check_pair", out)
        y_pred, y, loss = out if len(out) == 3 else (*out, None)
    if loss is None and loss_fn is not None:
        try:
            loss = loss_fn(y_pred, y)
        except Exception as e:  # costs nothing until it raises
            _maybe("_check_output", y_pred, forward, batch, e)
            raise
    if loss is not None and (not isinstance(loss, torch.Tensor) or loss.ndim):  # no host read
        _maybe("_refuse_loss", loss)
    return loss, y_pred, y


def _seam(loss_fn, forward, precision=None, device=None):
    """_forward_loss with a run's loss_fn, forward and autocast, decided once."""
    cast = None if precision is None else _block("mixed precision", "_autocast_to",
                                                 f"precision={precision!r}")(precision, device)
    return functools.partial(_forward_loss, loss_fn=loss_fn, cast=cast, forward=forward)


def _rates(optimizer):
    """{"lr": r} (the first group's), or {"lr_NAME": r, ...} for a dict of optimizers."""
    if isinstance(optimizer, dict):
        return {f"lr_{k}": o.param_groups[0]["lr"] for k, o in optimizer.items()}
    return {"lr": optimizer.param_groups[0]["lr"]}


def _fp32(out):
    """Outputs in fp32 at least, whatever autocast computed them in (for the metrics)."""
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _unwrap(model):
    """The plain module under torch.compile and (Distributed)DataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


# --- one epoch ----------------------------------------------------------------

_TICK_SECONDS = 0.1      # progress refresh: at most ten times a second
_CPU_CHECK_SECONDS = 1.0  # silent CPU runs still look for a NaN loss this often (reads are free)


class _EpochStart:
    """An epoch's number, rates, clock, and the random state before its order was drawn."""

    def __init__(self, epoch, lr, rng=None, elapsed_before=0.0):
        self.epoch, self.lr, self.rng = epoch, lr, rng
        self.elapsed_before, self.t0 = elapsed_before, time.perf_counter()

    def elapsed(self):  # including the seconds before a resume
        return self.elapsed_before + time.perf_counter() - self.t0


def _begin_epoch(epoch, plan, gen, lr, meter, *, shuffle, snapshot=None):
    """Epoch ``epoch``'s start and batches, or where last.pt's mid-epoch ``snapshot`` was."""
    source = plan.train
    if snapshot is not None:
        return _block("mid-epoch snapshots", "_continue_epoch", "resuming a last.pt saved "
                      "inside an epoch")(epoch, source, gen, meter, snapshot, shuffle=shuffle)
    rng = _rng_state(gen, source.generators) if plan.snapshots else None
    start = _EpochStart(epoch, lr, rng)
    return start, source.epoch(generator=gen, shuffle=shuffle, number=epoch)


def _train_loop(model, batches, stepper, meter, watch=None, on_batch_end=None, steps=0):
    """A step per batch (or group), summed by ``meter``; ``watch`` looks now and then. The
    place for a line after every step: no ``.item()`` here, on a GPU it waits."""
    model.train()
    step = start = meter.steps
    next_look = start + 1 if watch is not None else math.inf
    for group in stepper.groups(batches):
        done = stepper.step(model, group)
        for d in done:
            meter.add(*d)
        step += len(group)
        if on_batch_end is not None:
            on_batch_end(steps + stepper.optimizer_steps(step), stepper.loss(done))
        if step >= next_look:  # at a step's end, never inside a group
            next_look = watch(step, meter)
    if step == start == 0:
        raise ValueError("the training data yielded no batches; expected at least one")


def _epoch_logs(meter, model, plan, seam, val_fn=None):
    """The epoch's training and ``val_`` values in one host read, then ``val_fn``'s."""
    val = [] if plan.val is None else [
        _evaluate_pass(model, plan.val, seam, plan.stats, meter.tried)]
    logs, *val_logs = _read([meter, *val], plan.world)
    for k, v in val_logs[0].items() if val_logs else ():
        if k != "loss" or "val_loss" in plan.keys:
            logs["val_" + k] = v
    if val_fn is not None:
        with _eval_mode(model):
            values = plan.world.first(val_fn(model))  # rank 0's everywhere
        _maybe("_check_val_values", values, logs)
        logs.update(values)
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


def _evaluate_pass(model, source, seam, stats, tried=False):
    """One pass in eval mode without grad: its sums in a _Meter, unread."""
    loss_fn = seam.keywords["loss_fn"]
    meter = _Meter(stats, source.device, loss_fn, sharded=source.sharded, evaluating=True,
                   tried=tried)
    zero = torch.zeros((), device=source.device)  # each batch's loss, without a loss
    with _eval_mode(model):
        for batch in source.epoch():
            loss, out, yb = seam(model, batch)
            meter.add(zero if loss is None else loss, out, yb)
            meter.lossless = loss is None
    if meter.steps == 0 and not source.sharded:  # a rank's share of a small set may be empty
        raise ValueError("the evaluation data yielded no batches; expected at least one")
    return meter


class _Watch:
    """A look between steps at most every ``seconds`` (the clock read only when the rate says
    it is time): one host read (a NaN stops here), ``show`` the logs, then ``also``."""

    def __init__(self, seconds, steps, show, *, at_once=True, also=None):
        self.seconds, self.steps, self.show, self.also = seconds, steps, show, also
        self.t0, self.start = time.perf_counter(), None
        self.last = None if at_once else self.t0  # a live line shows the first step at once

    def __call__(self, step, meter):  # returns the step at which to ask again
        now = time.perf_counter()
        if self.start is None:
            self.start = step - 1
        if self.last is None or now - self.last >= self.seconds:
            self.last = now
            logs = _read([meter], final=False)[0]
            self.show(step, self.steps, logs, now - self.t0, step - self.start)
            if self.also is not None:
                self.also(step, meter)
        rate = (step - self.start) / max(now - self.t0, 1e-9)  # steps per second so far
        return step + max(1, int(rate * (self.seconds - (now - self.last))))


# --- exact sums ---------------------------------------------------------------

def _kept_bytes(t):
    """The bytes a meter counts for a tensor it keeps: those of 1 KiB or more."""
    n = getattr(t, "nbytes", 0)
    return n if n >= 1024 else 0


class _Totals(NamedTuple):
    """A meter's sums on the device, not yet read back."""
    flat: torch.Tensor  # [loss sum, its denominator, *each metric's sums]
    counts: list        # each metric's count
    sizes: list         # how many numbers each metric has in ``flat``
    maxima: list        # positions in ``flat`` that hold maxima (max_error)


class _Meter:
    """Sums of the loss and the metrics over one pass, on the device. ``add`` keeps tensors,
    folded in a few ops every ``_FOLD_STEPS`` steps, or once those of 1 KiB or more hold
    ``_PENDING`` bytes: kept between a step's freed buffers, they keep the allocator from
    reusing them. Fold points depend on steps and shapes alone, never on a look."""
    _FOLD_STEPS = 128
    _PENDING = 1 << 14

    def __init__(self, stats, device, loss_fn=None, *, sharded=False, evaluating=False,
                 tried=False, first_step=0, monitor=None):
        self.stats, self.device, self.sharded = stats, device, sharded
        # Losses are batch means (torch's default); a reduction="sum" loss is already a sum.
        self.loss_is_sum = getattr(loss_fn, "reduction", "mean") == "sum"
        self.weigh, self.loss_fn = _target_weights(loss_fn), loss_fn
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=self.dtype, device=device)
        self.loss_den = torch.zeros((), dtype=self.dtype, device=device)
        self.steps, self.sums, self.counts = 0, dict.fromkeys(stats), dict.fromkeys(stats, 0)
        self.evaluating = evaluating  # an evaluation pass: its steps are batches, not steps
        self.checked = 0    # steps whose loss is known to be finite
        self.unchecked = []  # folded losses not yet known to be finite, in step order
        self._losses, self._outs, self._ys, self._held = [], [], [], 0
        self.own = self.lossless = False  # summing train_step's values; no loss at all
        self.tried = tried  # the metrics ran on a batch of this run already (an epoch ago)
        self.first, self.monitor = first_step, monitor  # for train_step's values: the run's
        # steps before this pass (on_batch_end counts them) and the monitor they must hold
        self.kept = [[], []] if any(st.whole for st in stats.values()) else None  # all y_pred, y

    def add(self, loss, out, y, values=None):
        """A batch's loss (its mean), outputs and targets, kept until a fold (with
        train_step: its ``values``, and the batch as ``y``)."""
        if values is not None:  # train_step's: the first step's names, each a scalar
            if not self.steps:  # the first step: the names, in train_step's order
                _maybe("_check_step_values", values, monitor=self.monitor)
                self.stats, self.own = _value_stats(values), True
                self.sums, self.counts = dict.fromkeys(values), dict.fromkeys(values, 0)
            if values.keys() != self.stats.keys() or any(v.numel() != 1 for v in values.values()):
                _maybe("_check_step_values", values, list(self.stats), self.first + self.steps + 1)
            out = torch.cat([values[k].reshape(1) for k in self.stats]).reshape(1, -1)
            loss, y = out.sum(), _batch_rows(y)
        self._losses.append(loss)
        self._ys.append(y)  # its rows, and for the metrics and weights its values
        self._held += _kept_bytes(y)
        self.steps += 1
        if self.steps == 1:  # fail at the first batch, not at a fold or never
            _maybe("_check_first_batch", self, out, y)
        if self.stats:
            self._outs.append(out)
            self._held += _kept_bytes(out)
        if len(self._losses) == self._FOLD_STEPS or self._held > self._PENDING:
            self._fold()

    def _with_pending(self):
        """(loss sum, denominator, metric sums, counts, pending losses), the steps not yet
        folded in."""
        if not self._losses:
            return self.loss_sum, self.loss_den, self.sums, self.counts, None
        losses = torch.stack(self._losses)
        if self.weigh is None:  # the rows: shapes, read without a call per batch if we can
            ns = ([y.shape[0] for y in self._ys] if torch.is_tensor(self._ys[0])
                  else [_batch_rows(y) for y in self._ys])
            den, total = sum(ns), _loss_sum(losses, ns, self.loss_is_sum, self.dtype)
        else:  # the targets' weights; of equal shapes in one op
            weights = (self.weigh(torch.stack(self._ys)) if all(
                y.shape == self._ys[0].shape for y in self._ys) else torch.cat(
                [self.weigh(y.unsqueeze(0)) for y in self._ys])).to(self.dtype)
            losses = torch.where(weights > 0, losses, 0)
            den, total = weights.sum(), (losses.to(self.dtype) * weights).sum()
        sums, counts = _metric_sums(self.stats, self._outs, self._ys, self.dtype)
        sums = {k: _combine(st, self.sums[k], sums[k]) for k, st in self.stats.items()}
        counts = {k: self.counts[k] + counts[k] for k in self.stats}
        return self.loss_sum + total, self.loss_den + den, sums, counts, losses

    def _fold(self):
        self.loss_sum, self.loss_den, self.sums, self.counts, losses = self._with_pending()
        self.unchecked.append(losses)
        if len(self.unchecked) == 8:  # a few tensors kept until the next look, not hundreds
            self.unchecked = [torch.cat(self.unchecked)]
        if self.kept is not None:  # a whole_set metric sees every output of the epoch
            self.kept[0] += self._outs
            self.kept[1] += self._ys
        self._losses, self._outs, self._ys, self._held = [], [], [], 0

    def totals(self, world=None, final=True):
        """The sums so far, unread and unfolded; when ``final``, whole_set metrics too."""
        loss_sum, den, sums, counts, _ = self._with_pending()
        sums = dict(sums)  # the meter's own stay as they are
        if self.kept is not None:
            outs, ys = [world.cat(torch.cat(t + p)) if world else torch.cat(t + p)
                        for t, p in zip(self.kept, (self._outs, self._ys))]
            for k, st in self.stats.items():
                if st.whole is not None:
                    sums[k] = torch.as_tensor(st.whole(_fp32(outs), ys) if final else math.nan,
                                              dtype=self.dtype, device=self.device).reshape(1)
        parts, sizes, maxima, i = [loss_sum.reshape(1), den.reshape(1)], [], [], 2
        for k, st in self.stats.items():
            part = sums[k] if sums[k] is not None else torch.zeros(
                st.size, dtype=self.dtype, device=self.device)
            parts.append(part)
            sizes.append(part.numel())
            if st.reduce == "max":
                maxima += range(i, i + part.numel())
            i += part.numel()
        return _Totals(torch.cat(parts), list(counts.values()), sizes, maxima)

    def losses(self):
        """Every loss not yet known to be finite, in step order (from step checked + 1)."""
        chunks = self.unchecked + ([self._with_pending()[4]] if self._losses else [])
        return torch.cat(chunks) if chunks else torch.zeros(0, device=self.device)

    def check(self, loss_sum, world):
        """FloatingPointError at the first non-finite loss (``world`` None: a rank's own sums,
        read alone: the reduced read will stop every rank)."""
        if math.isfinite(loss_sum):
            self.checked += sum(len(u) for u in self.unchecked)
            self.unchecked = []
            return
        if world is None:
            return
        unit = "batch" if self.evaluating else "step"
        where = world.first_bad(self.losses(), self.checked, loss_sum, unit)
        raise (_EvaluationLossError if self.evaluating else FloatingPointError)(where)


def _value_stats(values):
    """train_step's values as statistics: batch means (column i), counted for the rows."""
    return {k: _Stat(lambda p, y, i=i: p[0, i].double() * y, lambda p, y: y, _ratio,
                     by_batch=True) for i, k in enumerate(values)}


def _target_weights(loss_fn):
    """y -> each target's weight in a CrossEntropyLoss/NLLLoss batch mean (``weight[y]``, 0 at
    ``ignore_index``); None for other losses, whose mean counts each row once."""
    if not isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)) or (
            loss_fn.reduction != "mean"):
        return None
    ignore, weight = loss_fn.ignore_index, loss_fn.weight

    def weigh(y):  # y: (steps, *target shape) of class indices
        if y.is_floating_point():  # probability targets: torch divides by the rows
            return torch.full(y.shape[:1], y.shape[1], dtype=torch.float64, device=y.device)
        keep = y != ignore
        w = keep if weight is None else weight[torch.where(keep, y, 0)] * keep
        return w.reshape(len(y), -1).sum(1, dtype=torch.float64)
    return weigh


def _loss_sum(losses, ns, loss_is_sum, dtype):
    """The rows' loss sum from batch means; a run of batches of one size in one op."""
    total, start = 0, 0
    for size, run in itertools.groupby(ns):
        run = len(list(run))
        part = losses if run == len(losses) else losses[start:start + run]
        total = total + part.sum(dtype=dtype) * (1 if loss_is_sum else size)
        start += run
    return total


def _metric_sums(stats, outs, ys, dtype):
    """({name: sums}, {name: count}): built-ins on all steps at once, yours batch by batch."""
    sums, counts = {k: None for k in stats}, {k: 0 for k in stats}
    each = joined = None  # the outputs in fp32 at least, whatever autocast made them
    if len(outs) > 1 and not all(st.by_batch for st in stats.values()):
        with contextlib.suppress(RuntimeError, TypeError):  # varying shapes (sequences),
            joined = [(_fp32(torch.cat(outs)), torch.cat(ys))]  # targets not tensors
    if joined is None or any(st.by_batch for st in stats.values()):
        each = [(_fp32(p), y) for p, y in zip(outs, ys)]
    for k, st in stats.items():
        for p, y in (each if st.by_batch else joined or each if st.whole is None else ()):
            s = st.stat(p, y).reshape(-1)
            sums[k] = _combine(st, sums[k], s if s.dtype == dtype else s.to(dtype))
            counts[k] += st.count(p, y)
    return sums, counts


def _combine(st, acc, s):
    if acc is None or s is None:
        return s if acc is None else acc
    return acc + s if st.reduce == "sum" else torch.maximum(acc, s)


def _read(meters, world=None, final=True):
    """The logs of several meters in one host read (a NaN loss raises); with ``world``, sums
    all-reduced first. Not ``final`` (a look): each rank its own, whole_set's wait."""
    reduced = [world is not None and m.sharded for m in meters]
    totals = [m.totals(world if r else None, final) for m, r in zip(meters, reduced)]
    flats = [world.reduce(t) if r else t.flat for t, r in zip(totals, reduced)]
    vals = (torch.cat(flats) if len(flats) > 1 else flats[0]).tolist()  # the one host read
    out, i = [], 0
    for m, t, r, flat in zip(meters, totals, reduced, flats):  # in order: a NaN in training
        v, i = vals[i:i + len(flat)], i + len(flat)                # stops before validation
        counts = v[len(t.flat):] if r else t.counts  # the ranks' counts follow their sums
        m.check(v[0], world if r else None if m.sharded else _ONE_PROCESS)
        logs = {} if m.own or m.lossless else {"loss": v[0] / v[1] if v[1] else math.nan}
        j = 2
        for (k, st), count, size in zip(m.stats.items(), counts, t.sizes):
            if final or st.whole is None:
                logs[k] = float(st.finish(v[j:j + size], count))
            j += size
        out.append(logs)
    return out


class _EvaluationLossError(FloatingPointError):
    """A loss that is not finite in an evaluation pass (fit's validation, evaluate)."""


# --- the run's record ---------------------------------------------------------

class _Record:
    """The run so far: history, best value, patience, why it stopped, the best weights."""
    _SAVED = ("history", "epoch", "best", "best_epoch", "wait", "stopped", "steps", "monitor",
              "mode")

    def __init__(self, keys, *, monitor, mode, min_delta=0.0, patience=None, keep_best=False,
                 later=False, better=None):
        self.history = {k: [] for k in keys}
        self.better = better or {}  # each value's better direction, where it is known
        self.later = later  # train_step's and val_fn's names join at the first epoch
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.patience, self.keep_best = patience, keep_best
        self.epoch, self.best, self.best_epoch, self.wait = 0, None, None, 0
        self.steps = 0  # optimizer steps, by the end of the last epoch recorded
        self.stopped = None  # why training stopped: "patience", "on_epoch_end", or None
        self.best_weights = None

    def state(self):
        return {k: getattr(self, k) for k in self._SAVED}

    def load(self, state):
        for k in self._SAVED:
            setattr(self, k, state[k])
        self.history = {k: list(v) for k, v in state["history"].items()}

    def result(self):
        """The history fit returns: a dict (with ``better``, from the plot hints block)."""
        history = _maybe("_History", self.history, self.better)
        return dict(self.history) if history is None else history

    def improves(self, value):
        """Whether ``value`` beats the best so far by more than min_delta (NaN never does)."""
        if self.best is None or not math.isfinite(value):
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def add(self, logs, model):
        """Append one epoch's values (``best_epoch`` too); return whether it improved."""
        logs["best_epoch"] = math.nan  # its place; set below
        if self.later and not self.history["epoch"] and set(self.history) <= set(logs):
            self.history = {k: [] for k in logs}  # train_step's and val_fn's names join
        _maybe("_check_logs", logs, self)
        self.epoch = int(logs["epoch"])
        value = logs[self.monitor]
        improved = self.improves(value)
        if improved:
            self.best, self.best_epoch, self.wait = value, self.epoch, 0
            if self.keep_best:
                self.best_weights = {k: v.detach().clone()
                                     for k, v in _unwrap(model).state_dict().items()}
        else:
            self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            self.stopped = "patience"
        logs["best_epoch"] = math.nan if self.best_epoch is None else self.best_epoch
        for k in self.history:
            self.history[k].append(float(logs[k]))
        return improved

    def epochs_to_run(self, epochs):
        return range(self.epoch + 1, (self.epoch if self.stopped else epochs) + 1)

    def why_stopped(self):
        if self.stopped == "patience":
            return (f"early stop: {self.monitor} did not improve for {self.patience} epochs "
                    f"(best {_num(self.best)} at epoch {self.best_epoch})")
        return None

    def restore_best(self, model, best_path):
        """Put the best epoch's weights back into the model (kept in memory, or best.pt)."""
        if self.best_epoch is None:
            return
        if self.best_weights is not None:
            _unwrap(model).load_state_dict(self.best_weights)
        elif best_path is not None and os.path.exists(best_path):
            load_checkpoint(best_path, model)


@contextlib.contextmanager
def _nan_stops_training(epoch, printer, model, store):
    """A non-finite loss stops training naming the epoch, what is kept, and whether it came
    from validation (with finite weights, then, the validation data is the suspect)."""
    try:
        yield
    except _EvaluationLossError as e:
        printer.close()
        bad = _maybe("_nonfinite_weights", model)  # None: not looked at (checkpoint guards)
        why = (f"The weights hold NaN or inf ({', '.join(bad[:3])}): a gradient of the last "
               "steps was not finite although their losses were" if bad else
               "Every training loss was finite" + (" and every weight is" if bad == [] else "")
               + ": look for NaN/inf in the validation data, or inputs the model overflows on")
        raise FloatingPointError(f"epoch {epoch}: validation {e}; training stopped "
                                 f"({store.kept()}). {why}") from None
    except FloatingPointError as e:
        printer.close()
        raise FloatingPointError(
            f"epoch {epoch}: {e}; training stopped ({store.kept()}). Lower the learning rate, "
            "clip gradients (clip_grad_norm=1.0) or look for NaN/inf in the data") from None


def _interrupted(stop, epoch, record, store, printer, world):
    """Ctrl-C: say what is kept; in a program re-raise with ``stop.history`` (one Ctrl-C
    ends it), at an interactive prompt return the history (the session goes on)."""
    interactive = world.size == 1 and (hasattr(sys, "ps1")
                                       or getattr(builtins, "__IPYTHON__", False))
    world.abandon()
    what = "returning the history of" if interactive else "stopping after"
    printer.line(f"interrupted during epoch {epoch}: {what} {record.epoch} completed "
                 f"epochs; {store.kept()}")
    if not interactive:
        stop.history = record.result()
        raise stop
    return record.result()


def _ask_hook(on_epoch_end, epoch, logs, record, store, world):
    """``on_epoch_end``; True stops training, saved in last.pt (a resume stops too). Every
    rank stops if any rank's hook asked, so that none waits for one that left."""
    asked = on_epoch_end is not None and on_epoch_end(epoch, dict(logs)) is True
    if world.any(asked):
        record.stopped = "on_epoch_end"
        store.save_last(record)


def _resume(store, record, epochs, plan, printer, on_epoch_end):
    """Continue from last.pt, if any; its dict if a mid-epoch snapshot. Resumed at the end of
    epoch N, N's hook runs again: the run may have died inside it, after last.pt."""
    snapshot = store.resume(record, epochs, plan.train.steps)
    if not record.epochs_to_run(epochs):
        printer.line(f"nothing to do: {record.epoch} epochs done" + (
            " (training had stopped early); to train on anyway, load its weights and optimizer "
            f"with loops.load_checkpoint({store.last_path!r}, model, optimizer) and fit into "
            "a new checkpoint directory" if record.stopped else
            f"; pass epochs= above {record.epoch} (the total) to train on"))
        return snapshot
    for line in store.notes:  # where it goes on from, what changed
        printer.line(line)
    if snapshot is None and record.epoch:
        logs = {k: v[-1] for k, v in record.history.items()}
        logs["epoch"] = int(logs["epoch"])
        _ask_hook(on_epoch_end, record.epoch, logs, record, store, plan.world)
    return snapshot


# --- checkpoints --------------------------------------------------------------

class _Store:
    """A run's checkpoint directory, written by rank 0: best.pt, last.pt, history.csv.
    What last.pt holds is written by ``save_last`` and read by ``resume``, side by side."""
    FORMAT = "loops/1"

    def __init__(self, directory, model, optimizer, scheduler, gen, *, world, scaler=None,
                 loaders=(), resume=True, settings=None):
        self.model, self.optimizer, self.scheduler, self.gen = model, optimizer, scheduler, gen
        self.loaders = loaders  # the training DataLoader's generators
        self.scaler = scaler  # fp16's GradScaler: its scale is part of the run
        self.settings = settings  # how the run trains (batch size, ...): compared on resume
        self.world, self.writer = world, world.writer
        self.dir = self.last_path = self.best_path = self.csv_path = self.lock = None
        self.holds = None  # what last.pt holds ("epoch 2 + 5 steps"), once it holds anything
        self.notes = []  # a resume's lines: where it goes on, the settings and rates it changed
        self.described = False  # run.json, written with the first epoch's files
        if directory is None:
            return
        self.dir = os.fspath(directory)
        _maybe("_check_writable", self.dir)
        os.makedirs(self.dir, exist_ok=True)
        self.last_path, self.best_path, self.csv_path = (
            os.path.join(self.dir, name) for name in ("last.pt", "best.pt", "history.csv"))
        if self.writer:  # one run at a time in a directory: rank 0 holds its lock
            self.lock = _maybe("_lock_dir", self.dir)
            if not resume and os.path.exists(self.last_path):  # (under the lock: no run
                self.release()                                 # can start beside this one)
                raise ValueError(f"{directory!r} already holds a run ({self.last_path}); pass "
                                 "resume=True to continue it, or choose another directory "
                                 "(nothing is overwritten)")

    def kept(self):  # in words: 'last.pt holds epoch 2'
        if self.dir is None:
            return "nothing is saved without checkpoint="
        return f"last.pt holds {self.holds}" if self.holds else "nothing saved yet"

    def release(self):  # fit's end, however it ends
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def save_epoch(self, record, improved):
        """last.pt, then best.pt (never ahead of last.pt: see resume), then history.csv."""
        if self.dir is None:
            return
        _maybe("_refuse_nonfinite", self, f"epoch {record.epoch}: ")
        with _ctrl_c_after():  # a Ctrl-C waits for the epoch's files and what they hold
            self.save_last(record)
            if improved:
                self.save_best(record)
            if self.writer:
                _write_csv(self.csv_path, record.history)
            if self.writer and not self.described:  # which way is better, for plots
                _maybe("_describe_run", self.dir, record)
                self.described = True

    def save_best(self, record):
        if self.writer or _is_sharded(self.model):  # every rank gathers a sharded model
            save_checkpoint(self.best_path, self.model, format=self.FORMAT, epoch=record.epoch,
                            monitor=record.monitor, value=record.best)

    def save_last(self, record, step=0, **inside):
        """last.pt at an epoch's end, or at batch ``step`` with a snapshot's ``inside``."""
        if self.dir is None:
            return
        rng = _rng_state(self.gen, self.loaders)
        ranks = self.world.gather(rng)  # every rank's random state, so that each resumes its own
        with _ctrl_c_after():  # a Ctrl-C waits for the file and the note of what it holds
            if self.writer or _is_sharded(self.model):
                save_checkpoint(
                    self.last_path, self.model, self.optimizer, format=self.FORMAT,
                    **record.state(),
                    scheduler=None if self.scheduler is None else _state_of(self.scheduler),
                    scaler=None if self.scaler is None else self.scaler.state_dict(),
                    rng=rng, rng_ranks=ranks, step=step, settings=self.settings, **inside)
            self.holds = f"epoch {record.epoch}" + (f" + {step} steps" if step else "")

    def resume(self, record, epochs, steps=None):
        """Continue from last.pt, if any; its dict when it is a mid-epoch snapshot."""
        if self.dir is None or not os.path.exists(self.last_path):
            return None
        ck = _read_checkpoint(self.last_path)
        self.notes = _maybe("_check_resumable", self, ck, record, epochs, steps) or []
        _load_into(ck, self.last_path, self.model, self.optimizer)
        where = f"epoch {ck['epoch'] + 1}" + (f", batch {ck['step'] + 1}," if ck["step"] else "")
        self.notes.insert(0, f"resuming {self.dir} at {where} of {epochs} from last.pt")
        _load_state(self.scheduler, ck["scheduler"])
        _load_state(self.scaler, ck.get("scaler"))
        record.load(ck)
        if self.writer:  # a kill between last.pt and history.csv left the CSV behind: catch up
            _write_csv(self.csv_path, record.history)
        if record.best_epoch == record.epoch and not ck["step"]:  # and best.pt: its weights
            self.save_best(record)                                # are the ones just loaded
        ranks = ck.get("rng_ranks") or [ck["rng"]]  # each rank's own, on as many ranks
        _set_rng_state(ranks[self.world.rank] if len(ranks) == self.world.size
                       else ck["rng"], self.gen, self.loaders)
        self.holds = f"epoch {ck['epoch']}" + (f" + {ck['step']} steps" if ck["step"] else "")
        return ck if ck["step"] else None


def _atomic_write(path, write):
    """Write ``path`` through a temp file beside it and os.replace: a crash leaves the old
    file. A Ctrl-C during the write waits for it to end (see _ctrl_c_after)."""
    with _ctrl_c_after():
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = _new_temp(os.path.join(folder, os.path.basename(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            _maybe("_raise_os_error", e)  # a full disk's, not torch's RuntimeError around it
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


@contextlib.contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C back until the block ends: torch's zip writer turns a KeyboardInterrupt
    into a RuntimeError. With Python's own handler only (a program's own is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _new_temp(path):
    """A new, empty ``path.<random>.tmp``, open for writing, with the mode any new file
    gets (0666 less the umask; tempfile.mkstemp's would be 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = f"{path}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _read_checkpoint(path, *, map_location="cpu"):
    """A checkpoint's dict, read with weights_only=True: no code can run while it loads."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        _maybe("_refuse_unreadable", path, e)
        raise
    _maybe("_check_checkpoint", ckpt, path)  # a dict with the model's weights
    return ckpt


def _load_into(ckpt, path, model, optimizer):
    """Load a checkpoint's weights and optimizer state, checked first that both fit (torch's
    load_state_dict copies what matches before it raises: a half-loaded model)."""
    if model is not None and ("shards" in ckpt or _is_sharded(model)):
        return _block("distributed", "_load_sharded", "sharding")(ckpt, path, model, optimizer)
    _maybe("_check_fits", ckpt, path, model, optimizer)
    if model is not None:
        _unwrap(model).load_state_dict(ckpt["model"])
    _load_state(optimizer, ckpt.get("optimizer"))


def _named(objects):
    """{name: object}: a dict of optimizers (schedulers) as it is, one as {"": it}."""
    return objects if isinstance(objects, dict) else {} if objects is None else {"": objects}


def _state_of(objects):
    """The state_dict of one optimizer (scheduler), or a dict of them for a dict of them."""
    if isinstance(objects, dict):
        return {k: o.state_dict() for k, o in objects.items()}
    return objects.state_dict()


def _load_state(objects, state):
    for name, o in _named(objects).items():
        o.load_state_dict(state[name] if name else state)


def _is_sharded(model):  # by FSDP2's fully_shard (setup_distributed(shard=True))
    return hasattr(type(model), "set_requires_gradient_sync")


def _write_csv(path, history):
    keys = list(history)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for row in zip(*(history[k] for k in keys)):
        w.writerow([int(v) if k in ("epoch", "best_epoch") and math.isfinite(v) else repr(v)
                    for k, v in zip(keys, row)])
    _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _shuffle_generator(seed, device, world, *, drawn=True):
    """The generator of each epoch's order; with ``seed`` every RNG seeded too, torch's with
    seed + rank (the ranks' orders agree, their dropout masks differ)."""
    gen = torch.Generator()
    if seed is not None:
        torch.manual_seed(seed + world.rank)  # CPU and every CUDA device
        random.seed(seed + world.rank)
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed((seed + world.rank) % 2**32)
        return gen.manual_seed(seed)
    if not drawn:
        return gen
    draw = world.broadcast(torch.randint(0, 2**62, (1,)).to(device))  # rank 0's, everywhere
    return gen.manual_seed(int(draw.item()))


def _rng_state(generator, loaders=()):
    """Every random state training draws on, as tensors and plain values (weights_only)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")  # saved only if the program uses numpy; never imported here
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if generator is not None:
        state["batches"] = generator.get_state()
    if loaders:
        state["loaders"] = [g.get_state() for g in loaders]
    return state


def _set_rng_state(state, generator, loaders=()):
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
    for g, saved in zip(loaders, state.get("loaders", ())):
        g.set_state(saved)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- processes ------------------------------------------------------------------

class _OneProcess:
    """The world of a run in one process: rank 0 of 1, the writer. The distributed block's
    _Ranks answers the same questions for a torchrun job, with collectives."""
    rank, size, writer = 0, 1, True

    def reduce(self, totals):
        return totals.flat

    def first_bad(self, losses, checked, total, unit):  # 'loss is nan at step 7'
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad) == 0:  # every loss finite, their weighted sum overflowed
            return f"the sum of the losses overflowed to {total}"
        j = int(bad[0])
        return f"loss is {losses[j].item()} at {unit} {checked + j + 1}"

    def broadcast(self, x):  # rank 0's value, the value itself here
        return x

    any = first = cat = broadcast  # the flag of any rank, rank 0's object, all ranks' rows

    def gather(self, *_):  # a list over the ranks: None in one process, as are DDP's
        return None        # no_sync, whether a loader gives each rank its own rows, ...

    no_sync = sharded_loader = check = abandon = gather


_ONE_PROCESS = _OneProcess()


def _world():
    """One process, or the distributed block's _Ranks for a group of several (torchrun)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _block("distributed", "_Ranks", "a process group of several ranks (torchrun)")()
    return _ONE_PROCESS


# --- data sources -------------------------------------------------------------

def _slices(X, y, batch_size, order, *, start=0, rows=None, rank=0, ranks=1):
    """This rank's (xb, yb) batches (xb alone without ``y``) after ``start``, cut in one call.
    A global batch goes in ``ranks`` equal parts (the short last's leftovers skipped)."""
    step = ranks * batch_size
    n = len(X) if rows is None else rows
    if order is None and ranks == 1:
        cut = [X[:n].split(batch_size)] + ([] if y is None else [y[:n].split(batch_size)])
    else:
        order = torch.arange(len(X), device=X.device) if order is None else order
        full = n // step
        idx = list(order[:full * step].view(full, ranks, batch_size)[:, rank].unbind(0))
        local = (n - full * step) // ranks
        if local:
            lo = full * step + rank * local
            idx.append(order[lo:lo + local])
        cut = [map(t.index_select, itertools.repeat(0), idx) if t.is_contiguous() else
               map(t.__getitem__, idx) for t in (X, y) if t is not None]  # keeps channels_last
    return itertools.islice(zip(*cut) if len(cut) == 2 else cut[0], start, None)


# Two kinds of data source, one face: ``steps`` (batches an epoch, or None), ``device``,
# ``sharded`` (each rank has its own rows: sums all-reduced), ``generators`` (saved in
# last.pt) and ``epoch(...)``, the batches of one epoch.
class _TensorSource:
    """(X, y) tensors (or X alone), moved to the device once and cut here each epoch.
    ``drop_last`` drops the rows after the last whole step (of ``accumulate`` batches)."""

    def __init__(self, X, y, *, batch_size, device, rank=0, ranks=1, sharded=False,
                 drop_last=False, accumulate=1):
        self.X = X.to(device)  # a no-op when already there
        self.y = None if y is None else y.to(device)
        self.batch_size, self.device, self.rank, self.ranks = batch_size, device, rank, ranks
        self.sharded = sharded
        self.generators = []  # the order is drawn from fit's own generator
        step = ranks * batch_size
        self.rows = len(X) - len(X) % (step * accumulate) if drop_last else None
        short = 0 if drop_last else (1 if len(self.X) % step // ranks else 0)
        self.steps = (len(self.X) if self.rows is None else self.rows) // step + short

    def epoch(self, *, generator=None, shuffle=False, start=0, number=0):
        """Batches of one epoch after ``start`` of them; the order is drawn now."""
        order = None
        if shuffle:
            order = torch.randperm(len(self.X), generator=generator)
            order = order.to(self.device, non_blocking=True)
        return _slices(self.X, self.y, self.batch_size, order, start=start, rows=self.rows,
                       rank=self.rank, ranks=self.ranks)


class _LoaderSource:
    """A re-iterable of (xb, yb) batches (a DataLoader, a list), used as it is; with
    ``pairs`` False (your forward or train_step reads them) batches of any shape."""

    def __init__(self, loader, *, device, what="data", pairs=True):
        self.loader, self.device, self.what, self.pairs = loader, device, what, pairs
        self.sharded = False  # unless a DistributedSampler gives each rank its own rows
        # The torch.Generators it draws from (its own, its sampler's, its batch sampler's
        # sampler's), once each: their states are part of a run, as the global one.
        owners = (loader, getattr(loader, "sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler", None))
        found = [getattr(o, "generator", None) for o in owners]
        self.generators = [g for i, g in enumerate(found) if isinstance(g, torch.Generator)
                           and all(g is not f for f in found[:i])]
        try:
            self.steps = len(loader)
        except TypeError:
            self.steps = None  # an IterableDataset: its length shows after one pass

    def epoch(self, *, generator=None, shuffle=False, start=0, number=0):
        """Batches of epoch ``number`` on the device, after ``start`` of them (passed over)."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles by epoch number
            sampler.set_epoch(number)
        it = iter(self.loader)
        for _ in range(start):
            next(it)
        return (self._batch(batch) for batch in it)

    def _batch(self, batch):
        if not self.pairs:
            return _to(batch, self.device)
        if type(batch) not in (tuple, list) or len(batch) != 2:
            _maybe("_refuse_batch", batch, self.what)
        xb, yb = batch
        return _to(xb, self.device), _to(yb, self.device)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):  # a dict, or a UserDict (Hugging Face's BatchEncoding)
        moved = {k: _to(v, device) for k, v in x.items()}
        with contextlib.suppress(TypeError):  # its own type, where it takes a dict
            return type(x)(moved)
        return moved
    return x


def _batch_rows(x):
    """A batch's rows: a tensor's first dimension, a mapping's or sequence's first entry's."""
    if isinstance(x, torch.Tensor):  # not torch.is_tensor: a Python call per batch
        return x.shape[0]
    if isinstance(x, int):  # already a count (train_step's batches)
        return x
    first = next(iter(x.values()), None) if isinstance(x, Mapping) else (
        x[0] if isinstance(x, (tuple, list)) and x else None)
    return _batch_rows(first) if isinstance(first, (torch.Tensor, Mapping, tuple, list)) else len(x)


def _is_pair(data):
    """Whether ``data`` is an (X, y) pair of tensors, batched here (else batches as given)."""
    return isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0])


# --- progress -----------------------------------------------------------------

# Formatting is pure functions returning strings (tested with golden strings);
# _Printer only writes them.

_NOT_VALUES = ("epoch", "lr", "time", "best_epoch")  # history keys that are not results


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
        if k not in _NOT_VALUES and not k.startswith("lr_"):
            parts.append(_format_value(k, v, k.removeprefix("val_") in percent))
    if seconds is not None:
        parts.append(_seconds(seconds))
    if best:
        parts.append("* best")
    return "  ".join(parts)


def _format_progress(epoch, epochs, step, steps, logs, elapsed, done, *, percent=(),
                     columns=None):
    """The live line: 'epoch 3/50  41/77  1534 it/s  ETA 0.02s  loss 0.4821', fitted to
    ``columns`` by leaving out the rate, the metrics from the last, ETA, the loss."""
    rate = done / elapsed if elapsed > 0 else 0.0
    head = [f"epoch {epoch}/{epochs}", f"{step}/{steps if steps else '?'}"]
    eta = [f"ETA {_seconds((steps - step) / rate)}"] if steps and rate > 0 else []
    values = [_format_value(k, v, k in percent) for k, v in logs.items()]
    rate_text = [f"{rate:.0f} it/s" if rate >= 10 else f"{rate:.2f} it/s"]
    parts = head + rate_text + eta + values
    text = "  ".join(parts)
    drop = rate_text + values[:0:-1] + eta + values[:1]  # the order in which fields go
    for gone in range(1, len(drop) + 1):
        if columns is None or len(text) <= columns:
            return text
        text = "  ".join(p for p in parts if p not in drop[:gone])
    return text if columns is None else text[:max(0, columns)]


def _terminal_columns(stream):
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 80


class _Printer:
    """What fit prints: verbose=1 on a terminal, a live line that ends as the epoch's
    summary; elsewhere (a log) and verbose=2, summary lines only, no carriage return."""

    def __init__(self, verbose, epochs, percent=(), stream=None):
        self.verbose, self.epochs, self.percent = verbose, epochs, percent
        self.stream = stream or sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = verbose == 1 and bool(isatty and isatty())
        self.width = 0  # of the live line on the screen, to be blanked by the next

    def progress(self, epoch, step, steps, logs, elapsed, done):
        """The live line, fitted to the width now: a wrapped line cannot be overwritten."""
        if self.live:
            columns = _terminal_columns(self.stream) - 1  # the last column wraps on some
            text = _format_progress(epoch, self.epochs, step, steps, logs, elapsed, done,
                                    percent=self.percent, columns=columns)
            self.stream.write("\r" + text.ljust(min(self.width, columns)))
            self.width = len(text)
            self.stream.flush()

    def summary(self, epoch, logs, *, best):
        if self.verbose:
            self.line(_format_summary(epoch, self.epochs, logs, percent=self.percent,
                                      seconds=logs["time"], best=best))

    def line(self, text):
        """A whole line, replacing the live line if there is one."""
        if self.verbose and text:
            pad = " " * max(0, self.width - len(text)) if self.live else ""
            self.stream.write(("\r" if self.live and self.width else "") + text + pad + "\n")
            self.width = 0
            self.stream.flush()

    def close(self):
        """End a live line that no summary will replace (an error is on its way)."""
        if self.live and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


# --- metrics ------------------------------------------------------------------
# For exact epoch values each metric keeps a sufficient statistic (a sum, a maximum,
# confusion counts) on the device, finished once an epoch: never a mean of batch values.
# Targets: (N,) or (N, 1) class indices, or (N, C) one-hot rows. Outputs: (N, C), C >= 2,
# class scores; else one probability per row, positive above 0.5 (a BCEWithLogitsLoss
# model's logit: above 0, the same rows). Binary targets are positive above 0.5.

class _Stat(NamedTuple):
    stat: Callable    # (y_pred, y) -> tensor: sums (or a maximum) over the rows given
    count: Callable   # (y_pred, y) -> int from shapes alone, so no host read
    finish: Callable  # (list of floats, count) -> float
    reduce: str = "sum"
    size: int = 1     # how many numbers ``stat`` returns (for class scores: C * C)
    percent: bool = False  # shown as 77.3% in the progress line
    better: str = None     # "max" (read from labels) or "min" (errors); None: not known
    by_batch: bool = False  # called on each batch, not on many at once (your own metrics)
    whole: Callable = None  # a whole_set metric: (all y_pred, all y) -> value, once an epoch


def _shapes(p, y):
    return f"predictions of shape {tuple(p.shape)} and targets of shape {tuple(y.shape)}"


def _error(p, y):
    """Predictions minus targets, row by row."""
    if p.shape != y.shape:
        if p.numel() != y.numel():
            raise ValueError(f"{_shapes(p, y)} do not match")
        y = y.reshape(p.shape)  # (N,) vs (N, 1) would otherwise broadcast to (N, N)
    return p - y


def _scores(p):
    """Whether ``p`` holds class scores (N, C), C >= 2, rather than one value per row."""
    return p.dim() >= 2 and p.shape[-1] >= 2


def _labels(p, y):
    """Class labels of targets ``y``: indices as they are, one-hot rows by their arg-max."""
    if y.shape == p.shape:
        return y.argmax(-1)
    if y.numel() * p.shape[-1] != p.numel():
        raise ValueError(f"{_shapes(p, y)} do not match: expected class indices of shape "
                         f"{tuple(p.shape[:-1])} (or with a trailing 1), or one-hot rows")
    return y.reshape(p.shape[:-1])


def _kept(y, ignore):
    """Which class-index targets count: not a loss's ``ignore_index`` (None: all)."""
    return None if ignore is None or y.is_floating_point() else y != ignore


def _right(right, keep):
    """[right rows, rows counted]; without an ignored label the right rows alone."""
    if keep is None:
        return right.sum()
    return torch.stack([(right & keep).sum(), keep.sum()])


def _correct(p, y, ignore):
    if not _scores(p):
        raise ValueError(f"accuracy expects class scores of shape (N, C) with C >= 2, got "
                         f"{tuple(p.shape)}; for one probability per row use binary_accuracy")
    labels = _labels(p, y)
    return _right(p.argmax(-1) == labels, _kept(labels, ignore))


def _binary_right(p, y, cut, ignore):
    y = y.reshape(p.shape)
    return _right((p > cut) == (y > 0.5), _kept(y, ignore))


def _ratio(s, n):
    return s[0] / n if n else math.nan


def _share(s, n):  # [right, counted]
    return s[0] / s[1] if s[1] else math.nan


def _n_rows(p, y):  # what a statistic is counted over, from shapes alone: its rows,
    return p.shape[0]


def _n_values(p, y):  # its values,
    return p.numel()


def _n_labels(p, y):  # the label positions of class scores (N, ..., C),
    return p.numel() // p.shape[-1]


def _n_none(p, y):  # or nothing (a maximum)
    return 0


def _stats(cut, ignore=None):
    """The built-in metrics: one value per row is positive above ``cut``."""
    def sq(p, y):
        return _error(p, y).square().sum(dtype=torch.float64)
    counted = {"size": 2, "count": _n_none, "finish": _share}  # [right, counted]
    table = {
        "accuracy": _Stat(lambda p, y: _correct(p, y, ignore), percent=True, better="max", **(
            counted if ignore is not None else {"count": _n_labels, "finish": _ratio})),
        "binary_accuracy": _Stat(lambda p, y: _binary_right(p, y, cut, ignore), percent=True,
                                 better="max", **(counted if ignore is not None else
                                                  {"count": _n_values, "finish": _ratio})),
        "mse": _Stat(sq, _n_values, _ratio, better="min"),
        "rmse": _Stat(sq, _n_values, lambda s, n: math.sqrt(s[0] / n), better="min"),
        "mae": _Stat(lambda p, y: _error(p, y).abs().sum(dtype=torch.float64), _n_values, _ratio,
                     better="min"),
    }
    return {**table, **(_maybe("_more_stats", cut, ignore) or {})}


def _metric(name, doc):
    """Built-in metric ``name`` as a function: fit's epoch value over one call's rows."""
    def metric(y_pred, y, *, logits=False, ignore_index=None):
        st = _stats(0.0 if logits else 0.5, ignore_index)[name]
        if ignore_index is not None and st.better == "min":  # the errors
            raise TypeError(f"{name} takes no ignore_index: it reads values, not class labels")
        with torch.no_grad():
            s = st.stat(y_pred, y).reshape(-1).tolist()
        return torch.tensor(st.finish(s, st.count(y_pred, y)), dtype=torch.float64)
    metric.__name__ = metric.__qualname__ = metric.builtin = name
    metric.__doc__ = doc
    return metric


_ABOUT_LOGITS = (" With ``logits=True`` one value per row is a logit, positive above 0"
                 " (fit, evaluate and train_epoch do this for a BCEWithLogitsLoss model).")
_ABOUT_IGNORED = (" Rows whose class-index target is ``ignore_index`` count nowhere (fit, evaluate"
                  " and train_epoch pass a CrossEntropyLoss/NLLLoss's own, -100 by default).")
accuracy = _metric("accuracy", "Fraction of rows whose arg-max class equals the label "
                   "(an index, (N,) or (N, 1), or a one-hot row)." + _ABOUT_IGNORED)
binary_accuracy = _metric("binary_accuracy", "Fraction of probabilities on the right side "
                          "of 0.5 (targets: above 0.5 is positive)." + _ABOUT_LOGITS
                          + _ABOUT_IGNORED)
mse = _metric("mse", "Mean squared error.")
rmse = _metric("rmse", "Root of the mean squared error (of the whole set, not a mean of roots).")
mae = _metric("mae", "Mean absolute error.")


def _metric_table(metrics, loss_fn=None):
    """{"name": fn or name} -> {"name": _Stat}; built-ins follow ``loss_fn`` (logits, ignored)."""
    if metrics is None:
        return {}
    logits = isinstance(loss_fn, torch.nn.BCEWithLogitsLoss)
    builtin = _stats(0.0 if logits else 0.5, loss_fn.ignore_index if isinstance(
        loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)) else None)
    table = {}
    for key, fn in metrics.items():
        name = fn if isinstance(fn, str) else getattr(fn, "builtin", None)
        if name in _BLOCK_OF and name not in builtin:
            _block(_BLOCK_OF[name], "_more_stats", f"metrics[{key!r}] ({name})")
        if name is not None:
            table[key] = builtin[name]
        elif isinstance(fn, _WholeSet):  # once an epoch, on every output (MAX over ranks
            table[key] = _Stat(None, _n_none, lambda s, n: s[0], "max", whole=fn.fn)  # = it)
        else:  # a per-sample mean, batch by batch: its epoch value is the rows'
            table[key] = _Stat(lambda p, y, fn=fn: _user_value(fn, p, y) * len(p), _n_rows,
                               _ratio, by_batch=True)
    return table


class _WholeSet(NamedTuple):
    fn: Callable


def whole_set(fn):
    """Mark ``fn(y_pred, y) -> scalar`` as a metric of a whole epoch's outputs (AUC): called
    once an epoch on all of them. Any other function of yours is a per-sample mean."""
    _maybe("_check_whole_set", fn)
    return _WholeSet(fn)


def _user_value(fn, p, y):
    v = fn(p, y)
    v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    if v.numel() != 1:
        _maybe("_refuse_metric_value", v)
    return v.detach().double().reshape(())


# --- building a run: what fit runs on -------------------------------------------

class _Plan(NamedTuple):
    """What fit runs on, built from its arguments."""
    device: torch.device
    world: object        # _OneProcess, or the distributed block's _Ranks
    stats: dict          # metric name -> _Stat, for validation (and training, but with
    train_stats: dict    # train_step, which gives no outputs)
    train: object        # a _TensorSource or _LoaderSource
    val: object          # the same, or None
    keys: list           # the history's keys known now, in order (train_step and val_fn
    monitor: str         # add theirs when they first return)
    mode: str            # "min" or "max"
    percent: set         # keys shown as percentages
    settings: dict       # how the run trains (batch size, ...): saved, compared on resume
    better: dict         # each value's better direction, where known (plot hints)
    snapshots: object    # save_every's _Snapshots (with save_every given), or None


def _plan(world, model, train, loss_fn, optimizer, *, val, batch_size, val_batch_size,
          metrics, monitor, mode, shuffle, drop_last, accumulate, precision, save_every,
          forward, train_step, val_fn, **_):
    """What fit runs on: device, metrics, data sources, history keys, monitor, settings."""
    device = model_device(model)
    stats = _metric_table(metrics, loss_fn)
    train_data = _source(train, what="train", batch_size=batch_size, device=device, world=world,
                         drop_last=drop_last, accumulate=accumulate,
                         pairs=forward is None and train_step is None)
    val_data = None if val is None else _source(  # no graph in evaluation: larger batches
        val, what="val", batch_size=val_batch_size or max(batch_size, 256), device=device,
        world=world, split_rows=True, pairs=forward is None)
    has_val_loss = val_data is not None and (  # a loss_fn's, or the model's own
        loss_fn is not None or forward is not None and train_step is None)
    keys = ["epoch"] + ([] if train_step else ["loss", *stats])
    if val_data is not None:
        keys += ["val_loss"] * has_val_loss + ["val_" + k for k in stats]
    keys += [*_rates(optimizer), "time", "best_epoch"]
    monitor = monitor or ("val_loss" if has_val_loss else "loss")
    _maybe("_check_monitor", monitor, keys, has_val=has_val_loss,
           later=train_step is not None or val_fn is not None)
    mode = _direction(monitor, mode, stats)
    _maybe("_try_first_val_batch", model, val_data, _seam(loss_fn, forward, precision, device),
           {k: st for k, st in stats.items() if st.whole is None})  # not on one batch: AUC
    settings = _maybe("_settings", **locals())  # saved in last.pt, compared on resume
    percent = {k for k, st in stats.items() if st.percent}
    snapshots = None if save_every is None else functools.partial(
        _block("mid-epoch snapshots", "_Snapshots", "save_every="), save_every)
    return _Plan(device, world, stats, {} if train_step else stats, train_data, val_data, keys,
                 monitor, mode, percent | {"val_" + k for k in percent}, settings,
                 _maybe("_directions", stats, monitor, mode), snapshots)


def _source(data, *, what, batch_size, device, world=None, pairs=True, drop_last=False,
            accumulate=1, split_rows=False):
    """``data`` as a batch source: tensors cut here, or batches used as they come. Several
    ranks cut training tensors per global batch, validation's (``split_rows``) by rows."""
    world = world or _ONE_PROCESS
    if torch.is_tensor(data) or _is_pair(data):
        X, y = (data, None) if torch.is_tensor(data) else data
        if split_rows and world.size > 1:
            return world.val_rows(X, y, batch_size, device, what)
        return _TensorSource(X, y, batch_size=batch_size, device=device, rank=world.rank,
                             ranks=world.size, sharded=world.size > 1, drop_last=drop_last,
                             accumulate=accumulate)
    source = _LoaderSource(data, device=device, what=what, pairs=pairs)
    source.sharded = world.sharded_loader(data, what)
    return source


def _direction(monitor, mode, stats):
    """``mode``, or for "auto" the loss's or a built-in metric's direction (never a guess)."""
    if mode != "auto":
        return mode
    base = monitor.removeprefix("val_")
    better = "min" if base == "loss" else getattr(stats.get(base), "better", None)
    if better is None:
        raise ValueError(f"mode='auto' does not know whether a higher or a lower {monitor!r} "
                         "is better (it is not the loss or a built-in metric): pass mode='max' "
                         "or mode='min'")
    return better


# --- optional blocks: how the core asks for them -----------------------------------
# Each optional block below may be deleted from a copy of this file. The core asks
# for a feature of a block through _block (a missing public name through __getattr__),
# so that a copy without it fails with a message naming the block; and for a guard
# rail (a check, the lock, more metrics) through _maybe, which does nothing then.

_BLOCK_OF = dict(lr_find="lr_find", setup_distributed="distributed", consolidate="distributed",
                 **dict.fromkeys(("mape", "max_error", "precision", "recall", "f1",
                                  "confusion_matrix"), "more metrics"))


def __getattr__(name):  # asked only for a name this module lacks
    if name not in _BLOCK_OF:
        raise AttributeError(f"module 'loops' has no attribute {name!r}")
    message = (f"loops.{name} is part of the optional block '{_BLOCK_OF[name]}', which this "
               "copy of loops.py does not have; copy that block back in from loops.py to use it")
    caller = sys._getframe(1)  # `from loops import NAME` would turn an AttributeError
    code = caller.f_code.co_code  # into a bare ImportError: raise that one itself
    importing = caller.f_lasti < len(code) and code[caller.f_lasti] == opcode.opmap["IMPORT_FROM"]
    raise (ImportError if importing else AttributeError)(message)


def _block(name, definition, asked):
    """``definition`` of the optional block ``name``, or a ValueError naming the block."""
    found = globals().get(definition)
    if found is None:
        raise ValueError(f"{asked} needs the optional block '{name}' of loops.py, which this "
                         f"copy does not have: copy the lines from '# --- optional: {name}' to "
                         f"'# --- end of {name}' back in from loops.py to use it")
    return found


def _maybe(definition, *args, **kw):
    """Call ``definition`` of an optional block if this copy has it; else None (nothing)."""
    found = globals().get(definition)
    return None if found is None else found(*args, **kw)


# --- optional: mid-epoch snapshots --------------------------------------------
# save_every=s: last.pt is refreshed every s seconds inside an epoch too, at a batch
# boundary, with what it takes to go on from there: the epoch's partial sums, its rates
# and time, and the random state before its order was drawn. Without this block
# last.pt is written at each epoch's end, and save_every= is refused naming the block.

class _Snapshots:
    """save_every's snapshots during one epoch, asked at each look of its _Watch."""

    def __init__(self, save_every, store, record, start):
        self.save_every, self.store, self.record, self.start = save_every, store, record, start
        self.last = time.perf_counter()

    def __call__(self, step, meter):
        if time.perf_counter() - self.last < self.save_every:
            return
        _maybe("_refuse_nonfinite", self.store, "")  # fit names the epoch
        start = self.start
        self.store.save_last(self.record, step, meter=_meter_state(meter), rng_epoch=start.rng,
                             epoch_lr=start.lr, epoch_time=start.elapsed())
        self.last = time.perf_counter()


def _continue_epoch(epoch, source, gen, meter, snapshot, *, shuffle):
    """Epoch ``epoch`` going on from last.pt's mid-epoch ``snapshot``. Bit-exact resume
    rests on the order of these lines: (1) the random state the epoch began with, so that
    (2) drawing the order and passing over the batches done gives the first run's order
    (a DataLoader redraws its own from that state); then (3) the state at the snapshot's
    batch, so that dropout goes on from there. Swap 1 and 2 and the order differs; leave
    out 3 and the first batches' masks come again."""
    start = _EpochStart(epoch, snapshot["epoch_lr"], snapshot["rng_epoch"],
                        snapshot["epoch_time"])
    _set_rng_state(start.rng, gen, source.generators)  # 1
    batches = source.epoch(generator=gen, shuffle=shuffle, start=snapshot["step"],
                           number=epoch)                 # 2
    _set_rng_state(snapshot["rng"], gen, source.generators)  # 3
    _load_meter(meter, snapshot["meter"], snapshot["step"])
    return start, batches


def _meter_state(m):
    """A meter's sums and pending steps, for a snapshot (taken right after a look)."""
    return {"loss_sum": m.loss_sum.cpu(), "loss_den": m.loss_den.cpu(),
            "counts": dict(m.counts), "own": m.own,
            "sums": {k: (v.cpu() if v is not None else None) for k, v in m.sums.items()},
            "losses": torch.stack(m._losses).cpu() if m._losses else None,
            "outs": [t.cpu() for t in m._outs], "ys": [_to(t, "cpu") for t in m._ys],
            "kept": _to(m.kept, "cpu")}


def _load_meter(meter, state, step):
    m, dev = meter, meter.device
    m.loss_sum, m.loss_den = state["loss_sum"].to(dev), state["loss_den"].to(dev)
    m.counts = dict(state["counts"])
    m.sums = {k: (v.to(dev) if v is not None else None) for k, v in state["sums"].items()}
    if state.get("own"):  # train_step's values: their names are the counts'
        m.stats, m.own = _value_stats(m.counts), True
    losses = state["losses"]
    m._losses = [] if losses is None else list(losses.to(dev))
    m._outs, m._ys = [t.to(dev) for t in state["outs"]], [_to(t, dev) for t in state["ys"]]
    m._held = sum(map(_kept_bytes, m._outs + m._ys))
    m.kept = _to(state["kept"], dev)
    m.steps, m.checked = step, step - len(m._losses)

# --- end of mid-epoch snapshots -----------------------------------------------


# --- optional: more metrics ---------------------------------------------------
# mape, max_error, precision, recall, f1 (binary, or the macro average over classes,
# exact over an epoch from the confusion counts) and confusion_matrix. Without this
# block the core's metrics remain, and these names are refused naming the block.

__all__ += ["mape", "max_error", "precision", "recall", "f1", "confusion_matrix"]

_MAPE_EPS = 1e-7  # as Keras: |y| is clamped so that a zero target does not divide by zero


def _more_stats(cut, ignore=None):  # as _stats makes the core's
    def counts(p, y):
        return _counts(p, y, cut, ignore)

    def macro(score):  # counted over the rows of class scores; 0: the counts are binary
        return _Stat(counts, lambda p, y: p.shape[0] if _scores(p) else 0,
                     lambda c, rows: _macro(score, c, rows), size=4, better="max")
    return {
        "mape": _Stat(lambda p, y: (_error(p, y).abs() / y.reshape(p.shape).abs()
                                    .clamp_min(_MAPE_EPS)).sum(dtype=torch.float64) * 100,
                      _n_values, _ratio, better="min"),
        "max_error": _Stat(lambda p, y: _error(p, y).abs().max(), _n_none, lambda s, n: s[0],
                           "max", better="min"),
        "precision": macro(lambda tp, fp, fn: _safe_div(tp, tp + fp)),
        "recall": macro(lambda tp, fp, fn: _safe_div(tp, tp + fn)),
        "f1": macro(lambda tp, fp, fn: _safe_div(2 * tp, 2 * tp + fp + fn)),
    }


def _counts(p, y, cut, ignore=None):
    """Confusion counts: [tn, fn, fp, tp] for one value per row (``p`` positive above
    ``cut``, ``y`` above 0.5); for class scores the C x C counts, rows true."""
    if _scores(p):
        k = p.shape[-1]
        labels = _labels(p, y).reshape(-1).long()
        cells = labels * k + p.argmax(-1).reshape(-1)
    else:
        k, labels = 2, y.reshape(-1)
        pred, true = (p > cut).reshape(-1), y.reshape(-1) > 0.5
        if pred.numel() != true.numel():
            raise ValueError(f"{_shapes(p, y)} do not match")
        cells = pred.long() * 2 + true.long()
    keep = _kept(labels, ignore)
    if keep is not None:
        cells = torch.where(keep, cells, k * k)  # a cell past the table: sliced off below
    return torch.bincount(cells, minlength=k * k)[:k * k]  # a label >= C counts nowhere


def _macro(score, c, class_rows):
    """``score(tp, fp, fn)`` of the positive class, or scikit-learn's macro mean over classes."""
    if not class_rows:
        tn, fn, fp, tp = c
        per = [(tp, fp, fn)]
    else:
        k = math.isqrt(len(c))
        rows = [c[i * k:(i + 1) * k] for i in range(k)]
        per = []
        for j in range(k):
            true_j, pred_j = sum(rows[j]), sum(r[j] for r in rows)
            if true_j or pred_j:
                per.append((rows[j][j], pred_j - rows[j][j], true_j - rows[j][j]))
    return sum(score(*t) for t in per) / len(per) if per else 0.0


def _safe_div(a, b):
    return a / b if b else 0.0  # scikit-learn's zero_division=0


mape = _metric("mape", "Mean absolute percentage error, in percent (|y| clamped at 1e-7).")
max_error = _metric("max_error", "Largest absolute error.")
_ABOUT_PRF = (" One probability per row: binary, positive above 0.5. Class scores (N, C): the"
              " macro average over the classes present in targets or predictions, as"
              " scikit-learn's average='macro'. 0 where nothing is predicted (or present)."
              + _ABOUT_LOGITS + _ABOUT_IGNORED)
precision = _metric("precision", "Precision, tp / (tp + fp)." + _ABOUT_PRF)
recall = _metric("recall", "Recall, tp / (tp + fn)." + _ABOUT_PRF)
f1 = _metric("f1", "F1 score, 2 tp / (2 tp + fp + fn)." + _ABOUT_PRF)


def _classes(t, num_classes, cut, what):  # as confusion_matrix reads them
    if _scores(t):
        return t.argmax(-1).reshape(-1)
    if t.is_floating_point():
        if num_classes == 2:
            return (t > cut).long().reshape(-1)
        if not torch.equal(t, t.round()):
            raise ValueError(f"confusion_matrix: {what} are fractional; with num_classes="
                             f"{num_classes} expected class numbers or (N, C) scores")
    return t.reshape(-1).long()


def confusion_matrix(y_pred, y, num_classes, *, logits=False, ignore_index=None):
    """Counts as a (num_classes, num_classes) int64 tensor: rows true, columns predicted.
    Class numbers, scores (N, C) or, for two classes, probabilities (logits with ``logits``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be an int >= 1, got "
                         f"{num_classes!r}")
    k = num_classes
    with torch.no_grad():
        pred = _classes(y_pred, k, 0.0 if logits else 0.5, "predictions")
        true = _classes(y, k, 0.5, "targets")
        if true.numel() != pred.numel():
            raise ValueError(f"confusion_matrix: {pred.numel()} predictions for "
                             f"{true.numel()} targets")
        keep = _kept(y.reshape(-1), ignore_index) if not _scores(y) else None
        if keep is not None:
            pred, true = pred[keep], true[keep]
        for what, c in (("predicted", pred), ("true", true)):
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= k):
                raise ValueError(f"confusion_matrix: a {what} class is outside 0..{k - 1} "
                                 f"(found {int(c.min())}..{int(c.max())}); pass the right "
                                 "num_classes")
        return torch.bincount(true * k + pred, minlength=k * k).reshape(k, k).cpu()

# --- end of more metrics ------------------------------------------------------


# --- optional: plot hints -----------------------------------------------------
# What plots need to know of a run that its numbers do not say: which way each value
# is better (the loss and the built-in metrics by their kind, the monitor by its mode),
# as fit's ``history.better`` and as run.json beside history.csv. plots_ascii marks a
# best only where it knows. Without this block fit returns a plain dict, no run.json.

import collections  # noqa: E402  (the block's own imports: they go with it)
import copy  # noqa: E402
import json  # noqa: E402


class _History(dict):
    """fit's history, with ``better``: {key: "min" or "max"} where the direction is known."""

    def __init__(self, history, better):
        super().__init__(history)
        self.better = dict(better)

    def __reduce__(self):  # saved (torch.save, pickle) as an OrderedDict, which torch.load
        return collections.OrderedDict, (list(self.items()),)  # takes with weights_only

    def __deepcopy__(self, memo):
        return _History(copy.deepcopy(dict(self), memo), self.better)


def _directions(stats, monitor, mode):
    """{key: "min" or "max"}: the loss, the built-in metrics, the monitor by fit's mode."""
    better = {"loss": "min", **{k: st.better for k, st in stats.items() if st.better}}
    better.update({"val_" + k: d for k, d in better.items()})
    better[monitor] = better[monitor.removeprefix("val_")] = mode  # the same value's
    return better                                                  # training side too


def _describe_run(directory, record):
    """run.json: the monitor, its mode and which direction is better for each value."""
    about = {"monitor": record.monitor, "mode": record.mode, "better": record.better}
    _atomic_write(os.path.join(directory, "run.json"),
                  lambda f: f.write(json.dumps(about).encode()))

# --- end of plot hints --------------------------------------------------------


# --- optional: mixed precision ------------------------------------------------
# precision="bf16" or "fp16": forward and loss under torch.autocast for the device,
# the weights, gradients and optimizer in fp32; fp16 steps through a GradScaler.
# Without this block, fit, train_epoch, evaluate and predict run in fp32 only.

import warnings  # noqa: E402  (the block's own imports: they go with it)

_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast_to(precision, device):
    return functools.partial(torch.autocast, device.type, dtype=_CAST[precision])


class _Scaler(torch.amp.GradScaler):
    """fp16's GradScaler, stepping as PyTorch's AMP recipe does (unscaled before clipping);
    the skipped steps are counted on the device and read once an epoch."""

    skipped, steps = 0, 0

    def update_weights(self, optimizer, parameters, clip_grad_norm):
        if clip_grad_norm:
            self.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        self.step(optimizer)
        if self.is_enabled():  # 1 where this step was skipped, summed without a host read
            found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
            self.skipped = self.skipped + sum(found.values())
            self.steps += 1
        self.update()

    def check_epoch(self):
        """Every step of the epoch skipped: below a scale of 1 the gradients are not finite
        unscaled either, and training stops (as fp32 would); above it, a warning."""
        skipped, steps, self.skipped, self.steps = self.skipped, self.steps, 0, 0
        if not steps or int(skipped) < steps:
            return
        scale = self.get_scale()
        what = (f"all {steps} fp16 optimizer steps were skipped (gradients not finite; "
                f"the loss scale fell to {scale:g}), so the weights did not change")
        if scale < 1:
            raise FloatingPointError(what)
        warnings.warn(what + "; the scale falls by half at each skip", RuntimeWarning,
                      stacklevel=4)


def _check_mixed_precision(precision, device):
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16': {torch.cuda.get_device_name(device)} cannot run "
                         "bfloat16; use precision='fp16' (with its GradScaler) or None")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision={precision!r} is for CPU and CUDA devices; on "
                         f"{device.type} use precision=None")

# --- end of mixed precision ---------------------------------------------------


# --- optional: distributed ----------------------------------------------------
# Runs under torchrun, one process per device: setup_distributed (DDP, or a model
# sharded with FSDP2), and _Ranks, the world of such a run (the core's _OneProcess is
# the world of one process); a sharded model's checkpoints, full or sharded, and
# consolidate. Without this block, a process group of several ranks is refused.

import atexit  # noqa: E402  (the block's own imports: they go with it)
import collections  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import weakref  # noqa: E402

__all__ += ["setup_distributed", "consolidate"]

_SHARDED = weakref.WeakKeyDictionary()  # a model sharded here -> its checkpoint format


def setup_distributed(model, *, backend=None, shard=False, precision=None, checkpoints="full"):
    """Under torchrun: join the group, move the model to this rank's device and wrap it in
    DistributedDataParallel, or shard it with FSDP2 (``shard=True``: each module with
    parameters of its own; or module classes, ``shard={Block}``). Returns ``(model,
    device)``; create the optimizer after. ``precision="bf16"``: FSDP's mixed precision.
    ``checkpoints``: "full" (gathered to rank 0) or "sharded" (see consolidate). More in
    docs/distributed.md."""
    _check_sharding(shard, precision, checkpoints)
    dist = torch.distributed
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return model, model_device(model)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        atexit.register(_leave_group)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model = model.to(device)
    if not shard:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None), device
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if device.type == "cpu":
        # Each step gathers and frees every module's weights; glibc then raises its mmap
        # threshold and the heap grows step after step. A fixed one (-3: 1 MiB) returns them.
        with contextlib.suppress(OSError, AttributeError, TypeError):
            ctypes.CDLL(None).mallopt(-3, 1 << 20)
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, torch.float32) if precision \
        else MixedPrecisionPolicy()
    for m in _shard_units(model, shard):  # the innermost first; the root last, with the rest
        fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.register_forward_pre_hook(_every_rank_here, prepend=True)  # before FSDP's gathers
    _SHARDED[model] = checkpoints
    return model, device


def _shard_units(model, shard):
    """The modules fully_shard shards on their own, innermost first. A tied weight goes
    whole into one unit: the innermost that holds all its owners, or the root."""
    if type(model).forward is torch.nn.Module.forward:
        raise ValueError(f"setup_distributed(shard=...): the model is a {type(model).__name__}, "
                         "which has no forward, and FSDP shards a model through its root's "
                         "forward: put its parts in a module whose forward runs them")
    every = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    units = []
    for m in list(model.modules())[1:]:
        if not (isinstance(m, tuple(shard)) if shard is not True else any(
                True for _ in m.parameters(recurse=False))):
            continue
        mine = collections.Counter(id(p) for _, p in m.named_parameters(remove_duplicate=False))
        apart = [n for n, p in m.named_parameters() if mine[id(p)] != every[id(p)]]
        if apart and shard is not True:
            raise ValueError(f"setup_distributed(shard={shard!r}): the {type(m).__name__}'s "
                             f"{apart[:2]} are tied to weights outside it, and would be sharded "
                             "apart from them: shard a class that holds both, or shard=True "
                             "(which keeps tied weights together)")
        if not apart:
            units.append(m)
    return reversed(units)


_RANKS_WAIT = 50  # seconds an evaluation forward of a sharded model waits for every rank


def _every_rank_here(model, args):
    """A sharded model's evaluation forward gathers weights from every rank: one rank alone
    (``if rank == 0: evaluate(...)``) gets this error in a minute, not a 30-minute wait."""
    if model.training:
        return
    t = torch.ones(1, device=_collective_device())
    try:
        torch.distributed.all_reduce(t, async_op=True).wait(
            timeout=datetime.timedelta(seconds=_RANKS_WAIT))
    except RuntimeError:
        raise RuntimeError(
            f"rank {torch.distributed.get_rank()}: the other ranks did not come within "
            f"{_RANKS_WAIT} s. A sharded model's evaluate, predict or eval forward must run on "
            "every rank together (it gathers the weights): print on rank 0") from None


def _collective_device():  # where the backend's collectives take their tensors
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


def _check_sharding(shard, precision, checkpoints):
    classes = isinstance(shard, (tuple, list, set, frozenset)) and shard and all(
        isinstance(c, type) and issubclass(c, torch.nn.Module) for c in shard)
    if not (isinstance(shard, bool) or classes):
        raise TypeError(f"shard must be True, False or module classes (a tuple or set; each "
                        f"instance is sharded), got {shard!r}")
    if precision not in (None, "bf16"):
        raise ValueError(f"precision={precision!r}: a sharded model takes None or 'bf16' (fp16 "
                         "would need its gradients unscaled across shards)")
    if checkpoints not in ("full", "sharded"):
        raise ValueError(f"checkpoints={checkpoints!r}: expected 'full' or 'sharded'")
    if (precision, checkpoints) != (None, "full") and not shard:
        raise ValueError("precision= and checkpoints= are options of a sharded model: pass "
                         "shard=True too")


@contextlib.contextmanager
def _no_gradient_sync(model):  # FSDP2's no_sync: gradients reduce-scattered at the last batch
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _opt_key(name):  # an optimizer's key among the shards
    return "optimizer" + (f"_{name}" if name else "")


def _renamed(osd, key, state=True):
    """An optimizer's state with each parameter's key ``key[k]``: torch.distributed.checkpoint
    names the parameters, torch.optim numbers them in its groups' order."""
    return {"state": {key[k]: st for k, st in osd["state"].items()} if state else {},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]}
                             for g in osd["param_groups"]]}


def _indexed(osd, state=True):
    """torch.distributed.checkpoint's optimizer state as torch.optim's (a plain model's)."""
    names = [n for g in osd["param_groups"] for n in g["params"]]
    return _renamed(osd, {n: i for i, n in enumerate(names)}, state)


def _save_sharded(path, model, optimizer, state):
    """save_checkpoint of a sharded model, every rank calling: gathered to rank 0; or each
    rank's shards in a fresh directory, then ``path`` naming it (the commit)."""
    from torch.distributed.checkpoint import state_dict as sd
    whole = _SHARDED.get(model, "full") == "full"
    options = sd.StateDictOptions(full_state_dict=whole, cpu_offload=whole)
    ckpt = {"model": sd.get_model_state_dict(model, options=options), **state}
    optims = {k: sd.get_optimizer_state_dict(model, o, options=options)
              for k, o in _named(optimizer).items()}
    if not whole:
        name = _Ranks().first(f"{os.path.basename(path)}.shards.{secrets.token_hex(6)}")
        torch.distributed.checkpoint.save(
            {"model": ckpt["model"], **{_opt_key(k): v for k, v in optims.items()}},
            checkpoint_id=os.path.join(os.path.dirname(path), name))
        ckpt.update(model={}, shards=name)
    if torch.distributed.get_rank() != 0:
        return
    if optimizer is not None:  # as torch.optim's, the state left in the shards if sharded
        optims = {k: _indexed(v, whole) for k, v in optims.items()}
        ckpt["optimizer"], ckpt["optimizer_type"] = (
            (optims[""], type(optimizer).__name__) if "" in optims else
            (optims, {k: type(o).__name__ for k, o in optimizer.items()}))
    if not whole:  # every shard file's checksum, in the file that commits them
        ckpt["shard_sums"] = _maybe("_seal_shards", os.path.join(os.path.dirname(path), name))
    _maybe("_check_plain", ckpt, "checkpoint")
    _maybe("_seal", ckpt)
    _atomic_write(os.fspath(path), lambda f: torch.save(ckpt, f))
    if not whole:
        _drop_old_shards(path, ckpt)


def _load_sharded(ck, path, model, optimizer):
    """_load_into for a sharded model or checkpoint, every rank calling: the whole state,
    each rank taking its shards; or the shards ``path`` names, on any number of ranks."""
    if not _is_sharded(model):
        raise ValueError(f"{path} is a sharded checkpoint (its weights are in {ck['shards']}, "
                         "one file per rank): load it into a model sharded as it was, or make "
                         f"it a plain one with loops.consolidate({os.path.dirname(path)!r})")
    from torch.distributed.checkpoint import state_dict as sd
    _maybe("_check_fits", ck, path, None if "shards" in ck else model, optimizer)
    opts, options = _named(optimizer), sd.StateDictOptions(full_state_dict="shards" not in ck)
    if "shards" in ck:
        where = os.path.join(os.path.dirname(path), ck["shards"])
        if not os.path.isdir(where):
            raise ValueError(f"{path} names the shard directory {ck['shards']}, which is not "
                             "there; nothing was loaded")
        _maybe("_check_shards", where, ck.get("shard_sums"), path)
        state = {"model": sd.get_model_state_dict(model), **{
            _opt_key(k): sd.get_optimizer_state_dict(model, o) for k, o in opts.items()}}
        torch.distributed.checkpoint.load(state, checkpoint_id=where)
        weights, optims = state["model"], {k: state[_opt_key(k)] for k in opts}
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        weights, optims = ck["model"], {}
        for k, o in opts.items():  # torch.optim's numbers back to the parameters' names
            fqn = [names[id(p)] for g in o.param_groups for p in g["params"]]
            optims[k] = _renamed(ck["optimizer"][k] if k else ck["optimizer"], fqn)
    sd.set_model_state_dict(model, weights, options=options)
    for k, o in opts.items():
        sd.set_optimizer_state_dict(model, o, optims[k], options=options)


def _drop_old_shards(path, ckpt):
    """Remove ``path``'s shard directories but the one it names (older, or a kill's)."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + ".shards."
    for name in os.listdir(folder):
        if name.startswith(prefix) and name != ckpt.get("shards"):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def consolidate(run_dir):
    """Make a sharded run's best.pt and last.pt whole, plain ones, and remove its shard
    directories. In one process, while no run uses the directory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir!r} is not a directory; expected a run's checkpoint directory")
    lock = _maybe("_lock_dir", run_dir)  # no run may use it meanwhile (checkpoint guards)
    try:
        for name in ("best.pt", "last.pt"):
            path = os.path.join(run_dir, name)
            ck = _read_checkpoint(path) if os.path.exists(path) else {}
            if "shards" in ck:
                folder = os.path.join(run_dir, ck.pop("shards"))
                _maybe("_check_shards", folder, ck.pop("shard_sums", None), path)
                with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
                    dcp_to_torch_save(folder, os.path.join(tmp, "whole.pt"))
                    whole = torch.load(os.path.join(tmp, "whole.pt"), weights_only=True)
                ck["model"] = whole["model"]
                if "optimizer" in ck:
                    one = "param_groups" in ck["optimizer"]
                    ck["optimizer"] = _indexed(whole["optimizer"]) if one else {
                        k: _indexed(whole[_opt_key(k)]) for k in ck["optimizer"]}
                _maybe("_seal", ck)
                _atomic_write(path, lambda f: torch.save(ck, f))
            if os.path.exists(path):
                _drop_old_shards(path, {})
    finally:
        if lock is not None:
            lock.release()


def _leave_group():
    # At exit, once every rank is there: a rank leaving while another uses the connection
    # can abort in gloo's threads. Those outlive destroy_process_group, and one that takes
    # the GIL at interpreter shutdown aborts the same way: so wait (a second at most, the
    # GIL free) until every other thread sleeps.
    dist = torch.distributed
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # raised when another rank left already
            dist.barrier()
        dist.destroy_process_group()
    me, deadline, calm = str(threading.get_native_id()), time.monotonic() + 1, 0
    while calm < 3 and time.monotonic() < deadline:
        time.sleep(0.005)  # lets a thread that waits for the GIL finish
        try:
            states = [_thread_state(t) for t in os.listdir("/proc/self/task") if t != me]
        except OSError:  # not Linux (nothing to wait for), or a thread that just ended
            states = ["S"] if not os.path.isdir("/proc/self/task") else ["?"]
        calm = calm + 1 if all(s == "S" for s in states) else 0


def _thread_state(tid):
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # R running, S sleeping, ...


class _Ranks:
    """A torchrun job's world: _OneProcess's answers, with collectives (so every rank asks
    the same questions in the same order)."""

    def __init__(self):
        dist = torch.distributed
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.writer, self.lockstep = self.rank == 0, False

    def reduce(self, totals):
        """[loss sum, denominator, *metric sums, *counts] over the ranks (maxima: max)."""
        dist, flat = torch.distributed, totals.flat
        flat = torch.cat([flat, torch.tensor(totals.counts, dtype=flat.dtype, device=flat.device)])
        total = flat.clone()
        dist.all_reduce(total)
        if totals.maxima:
            top = flat.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            total[totals.maxima] = top[totals.maxima]
        return total

    def first_bad(self, losses, checked, total, unit):
        """The same answer on every rank: the first bad step of any rank."""
        dist, device = torch.distributed, losses.device
        bad = (~torch.isfinite(losses)).nonzero()
        j = int(bad[0]) if len(bad) else 2**40
        key = torch.tensor([(checked + j) * self.size + self.rank], dtype=torch.float64,
                           device=device)
        dist.all_reduce(key, op=dist.ReduceOp.MIN)
        step, owner = divmod(int(key.item()), self.size)
        mine = losses[j].double().reshape(1) if owner == self.rank else torch.zeros(
            1, dtype=torch.float64, device=device)
        dist.all_reduce(mine)
        return f"loss is {mine.item()} at {unit} {step + 1} on rank {owner}"

    def gather(self, obj):
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag):
        t = torch.tensor([float(flag)], device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, t):
        torch.distributed.broadcast(t, src=0)
        return t

    def first(self, obj):
        out = [obj]
        torch.distributed.broadcast_object_list(out, src=0)
        return out[0]

    def cat(self, t):
        return torch.cat([p.to(t.device) for p in self.gather(t.cpu())])

    def no_sync(self, model):
        if _is_sharded(model):
            return functools.partial(_no_gradient_sync, model)
        return getattr(model, "no_sync", None)  # DistributedDataParallel's

    def sharded_loader(self, loader, what):
        """A DataLoader must give each rank its own rows (a DistributedSampler) to train."""
        sampler = getattr(loader, "sampler", None)
        sharded = isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
        if what == "train" and not sharded:
            raise ValueError(f"{what}: under torch.distributed a DataLoader needs a "
                             "DistributedSampler, or every rank trains on every batch: "
                             "DataLoader(dataset, sampler=DistributedSampler(dataset), ...)")
        if what == "val" and sharded and len(sampler.dataset) % self.size:
            raise ValueError(f"val: a DistributedSampler makes {len(sampler.dataset)} rows even "
                             f"over {self.size} ranks by repeating some, which would count "
                             "twice: pass val=(X, y) tensors, which loops splits exactly")
        return sharded

    def check(self, model, optimizer, save_every, clip_grad_norm, precision):
        self.lockstep = _is_sharded(model)  # every rank runs each forward: it gathers weights
        if self.lockstep:
            _check_sharded(model, optimizer, clip_grad_norm, precision)
        elif not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"the process group has {self.size} ranks but the model is not "
                             "wrapped in DistributedDataParallel, so the ranks would not share "
                             "gradients: model, device = loops.setup_distributed(model) first")
        if save_every is not None:
            raise ValueError("save_every is not supported under torch.distributed: a snapshot "
                             "would need every rank at the same step")

    def val_rows(self, X, y, batch_size, device, what):
        """This rank's validation rows, in as many batches as every rank's (a sharded
        model's forward gathers from all): ceil(ceil(n / ranks) / batch_size)."""
        lo, hi = len(X) * self.rank // self.size, len(X) * (self.rank + 1) // self.size
        batches = -(-(-(-len(X) // self.size)) // batch_size)
        if self.lockstep and len(X) // self.size < batches:
            raise ValueError(f"{what}: {len(X)} rows over {self.size} ranks cannot make "
                             f"{batches} batches on every rank, as a sharded model needs: give "
                             "more rows or a larger val_batch_size")
        return _RankRows(X[lo:hi], y[lo:hi], batches, batch_size=batch_size, device=device,
                         sharded=True)

    def abandon(self):
        """After a Ctrl-C: take the group down now, with no barrier: the ranks waiting for
        this one fail at once, and torchrun stops the job (not a 30-minute timeout)."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

class _RankRows(_TensorSource):
    """A rank's validation rows cut into ``batches`` batches (empty ones left out)."""

    def __init__(self, X, y, batches, **kw):
        super().__init__(X, y, **kw)
        self.steps = batches

    def epoch(self, **_):
        return ((xb, yb) for xb, yb in zip(self.X.tensor_split(self.steps),
                                           self.y.tensor_split(self.steps)) if len(xb))


def _check_sharded(model, optimizer, clip_grad_norm, precision):
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for o in _named(optimizer).values() for g in o.param_groups
           for p in g["params"]):
        raise ValueError("the optimizer holds parameters that are not the sharded model's "
                         "(fully_shard replaces them): build it after setup_distributed")
    plain = [n for n, p in model.named_parameters() if not hasattr(p, "to_local")]
    if clip_grad_norm and plain and len(plain) < len(own):
        raise ValueError(f"clip_grad_norm: the parameters {plain[:3]} are plain tensors, the "
                         "others sharded (DTensors), and one norm cannot be taken over both; "
                         "shard the module that holds them too (shard=True shards them all)")
    if precision is not None:
        raise ValueError(f"precision={precision!r}: a sharded model's precision is chosen when "
                         f"it is sharded: setup_distributed(model, shard=True, precision="
                         f"{precision!r})")

# --- end of distributed -------------------------------------------------------


# --- optional: lr_find --------------------------------------------------------
# The learning-rate range test. Without this block, loops.lr_find is an
# AttributeError that names it.

import copy  # noqa: E402  (the block's own imports: they go with it)

__all__ += ["lr_find"]

_LR_BETA = 0.98    # the smoothing of the loss curve (an exponential moving average)
_LR_DIVERGE = 4.0  # the search stops once the smoothed loss passes this many times its best


def lr_find(model, train, loss_fn, optimizer, *, start_lr=1e-7, end_lr=10, steps=100,
            batch_size=32, device=None, precision=None, forward=None):
    """The learning-rate range test: a batch per step, the rate rising from ``start_lr`` to
    ``end_lr``; returns {"lr", "loss" (smoothed), "suggestion"}, all else left as it was."""
    _maybe("_check_lr_find", **locals())
    device = model_device(model)
    source = _source(train, what="train", batch_size=batch_size, device=device,
                     pairs=forward is None)
    stepper = _Stepper(optimizer, precision=precision, device=device, loss_fn=loss_fn,
                       forward=forward)
    before = _Before(model, optimizer, source.generators, loss_fn)
    try:
        return _range_test(model, source, loss_fn, stepper, start_lr, end_lr, steps)
    finally:
        before.restore()


def _range_test(model, source, loss_fn, stepper, start_lr, end_lr, steps):
    batches = _cycled(source, torch.Generator().manual_seed(0))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for group in stepper.optimizer.param_groups:
            group["lr"] = lr
        (loss, _, _), = stepper.step(model, [next(batches)])
        value = loss.item()  # a host read per step: the test is short and needs each loss
        avg = _LR_BETA * avg + (1 - _LR_BETA) * value
        smooth = avg / (1 - _LR_BETA ** (i + 1))
        if not math.isfinite(smooth) or smooth > _LR_DIVERGE * best:
            break
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
    if not lrs:
        raise FloatingPointError(f"lr_find: the loss is {value} at the first rate "
                                 f"({start_lr:g}); check the data, the model and the loss")
    return {"lr": lrs, "loss": losses, "suggestion": _suggestion(lrs, losses)}


def _cycled(source, gen):
    """The source's batches, epoch after epoch (reshuffled), for as long as asked."""
    for number in itertools.count():
        empty = True
        for batch in source.epoch(generator=gen, shuffle=True, number=number):
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: the training data yielded no batches")


def _suggestion(lrs, losses):
    """The rate nearest a tenth of the lowest loss's (fastai's lr_min; the steepest descent
    proved too high), skipping the first tenth, where a flat start can be lowest."""
    skip = max(1, len(lrs) // 10)
    low = min(range(skip, len(lrs) - 1) or range(len(lrs)), key=losses.__getitem__)
    target = math.log(lrs[low] / 10)
    return min(lrs[skip:low + 1] or lrs[:low + 1], key=lambda v: abs(math.log(v) - target))


class _Before:
    """Everything lr_find changes, restored into the same objects (a reference to a tensor
    or a param group stays true): weights, buffers, gradients, modes, optimizer, RNG."""

    def __init__(self, model, optimizer, loaders=(), loss_fn=None):
        self.modules = [m for root in (model, loss_fn) if isinstance(root, torch.nn.Module)
                        for m in root.modules()]
        self.optimizer, self.loaders = optimizer, loaders
        self.tensors = [(where, name, t, t.detach().clone()) for m in self.modules
                        for where in (m._parameters, m._buffers)
                        for name, t in where.items() if t is not None]
        self.grads = [(t, None if t.grad is None else t.grad.detach().clone())
                      for where, _, t, _ in self.tensors if isinstance(t, torch.nn.Parameter)]
        self.modes = [m.training for m in self.modules]
        self.groups = [dict(g) for g in optimizer.param_groups]  # the same values
        self.group_values = [(v, v.detach().clone()) for g in self.groups for v in g.values()
                             if torch.is_tensor(v)]
        self.state = {p: copy.deepcopy(st) for p, st in optimizer.state.items()}
        self.rng = _rng_state(None, loaders)

    def restore(self):
        with torch.no_grad():
            for where, name, t, value in self.tensors:
                where[name] = t  # the same object, if it was replaced
                t.copy_(value)
            for t, value in self.group_values:
                t.copy_(value)
        for t, grad in self.grads:
            t.grad = grad
        for m, training in zip(self.modules, self.modes):
            m.training = training
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            group.clear()
            group.update(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(self.state)
        _set_rng_state(self.rng, None, self.loaders)


# --- end of lr_find -----------------------------------------------------------


# --- optional: checkpoint guards ----------------------------------------------
# Beyond atomic writes: one run per directory (its lock), the diagnosis of a damaged
# last.pt before anything loads, checkpoints that must fit the model and optimizer
# (torch would half-load them), the settings compared on resume, checksums, no NaN
# weights saved. Without it a good run resumes the same; a damaged one meets torch.

import ctypes  # noqa: E402  (the block's own imports: they go with it)
import re  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import zlib  # noqa: E402


def _lock_dir(directory):
    lock = _DirLock(directory)
    for name in os.listdir(directory):  # a killed run's temp files, only now (another run's
        if _OWN_TEMP.fullmatch(name):   # would be in flight) and only those: yours stay
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
    return lock


# The temp files _new_temp makes for the files fit writes; nothing else is ever removed.
_OWN_TEMP = re.compile(r"(best\.pt|last\.pt|history\.csv|run\.json)\.[0-9a-f]{12}\.tmp")


def _refuse_nonfinite(store, where):
    """FloatingPointError before a save if a weight is NaN or inf: a gradient can be NaN
    while the loss is finite (sqrt at 0), and such weights must not replace a good one."""
    bad = _nonfinite_weights(store.model)
    bad = list(dict.fromkeys(n for names in store.world.gather(bad) or [bad] for n in names))
    if bad:
        raise FloatingPointError(
            f"{where}the weights hold NaN or inf ({', '.join(bad[:3])}{', ...' * (len(bad) > 3)})"
            f" although every loss was finite: a gradient was not (sqrt or log at 0, a norm of "
            f"zeros). Nothing was written from them ({store.kept()})")


def _nonfinite_weights(model):  # one host read when there are none
    params = [(n, p.to_local() if hasattr(p, "to_local") else p)  # a sharded model's: this
              for n, p in _unwrap(model).named_parameters()]      # rank's shard (DTensor)
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return []
    return [name for name, p in params if not bool(torch.isfinite(p).all())]


def _raise_os_error(e):
    """Raise the OSError that ``e`` wraps (torch's zip writer wraps a full disk's)."""
    cause, seen = e, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause is not e:
        raise cause from e


def _refuse_unreadable(path, e):
    if isinstance(e, FileNotFoundError):
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    raise ValueError(f"{path} is not a plain checkpoint: it holds more than tensors and plain "
                     "values (unpickling it could run code), or it is damaged. torch said: "
                     f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def _check_checkpoint(ckpt, path):
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a loops checkpoint (expected a dict with 'model')")
    if "checksum" in ckpt and ckpt["checksum"] != _crc32(ckpt):
        raise ValueError(f"{path} is damaged: what it holds no longer matches the checksum "
                         "written with it; nothing was loaded. Resume from a copy, or move it "
                         "away to start afresh")


def _seal(ckpt):
    """A checksum of all it holds: a flipped bit on disk is refused, not trained from."""
    ckpt["checksum"] = _crc32(ckpt)


def _crc32(value, crc=0, top=True):
    """CRC-32 of the tensors' bytes (read in place) and of the plain values, in order."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not (top and k == "checksum"):
                crc = _crc32(v, _crc32(k, crc, False), False)
    elif isinstance(value, (list, tuple)):
        for v in value:
            crc = _crc32(v, crc, False)
    elif torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32((ctypes.c_char * (t.numel() * t.element_size())).from_address(
                t.data_ptr()), crc)
    else:
        crc = zlib.crc32(repr(value).encode(), crc)
    return f"crc32:{crc:08x}" if top else crc


def _seal_shards(folder):
    return {name: _file_crc32(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _check_shards(folder, sums, path):
    for name, crc in (sums or {}).items():
        where = os.path.join(folder, name)
        wrong = "missing" if not os.path.isfile(where) else (
            "changed" if _file_crc32(where) != crc else None)
        if wrong:
            raise ValueError(f"{path} is damaged: the shard file {name} it names in "
                             f"{os.path.basename(folder)} is {wrong}; nothing was loaded from "
                             "it. Resume from a copy, or move it away to start afresh")


def _file_crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _check_fits(ckpt, path, model, optimizer):
    """Before anything loads: the weights and optimizer state fit ``model``, ``optimizer``."""
    own, state = ({} if model is None else _unwrap(model).state_dict()), ckpt["model"]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own] if model is not None else []
    shapes = [f"{k}: {tuple(state[k].shape)} saved vs {tuple(v.shape)} here"
              for k, v in own.items() if k in state and torch.is_tensor(state[k])
              and state[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f"missing {missing[:3]}" if missing else "",
                 f"unexpected {extra[:3]}" if extra else "", "; ".join(shapes[:3])]
        raise ValueError(f"{path} was saved from a different model architecture: "
                         + "; ".join(p for p in parts if p))
    if optimizer is not None:
        _check_optimizer_fits(optimizer, ckpt, path)


def _check_resumable(store, ck, record, epochs, steps=None):
    """Refuse a last.pt that is a wrong place to go on from; return what this run changes."""
    path = store.last_path
    if ck.get("format") != store.FORMAT:
        raise ValueError(f"{path} was not written by fit (no 'format': '{store.FORMAT}'); "
                         "cannot resume")
    wrong = _damage(ck, steps)
    if wrong:
        raise ValueError(f"{path} is damaged: {wrong}; nothing was loaded from it. Resume "
                         "from a copy, or move it away to start afresh")
    saved, keys = list(ck["history"]), list(record.history)
    if saved != keys and not (record.later and [k for k in saved if k in keys] == keys):
        older = "best_epoch" not in saved  # written before that column was kept
        raise ValueError(f"{path} recorded {saved}, this run records {keys}; " + (
            "it was written by an older loops.py: finish it with that one" if older
            else "resume with the same metrics, val, train_step and val_fn"))
    if (ck["monitor"], ck["mode"]) != (record.monitor, record.mode):
        raise ValueError(f"{path} monitored {ck['monitor']!r} (mode {ck['mode']!r}), this run "
                         f"{record.monitor!r} ({record.mode!r}): resume with the same monitor")
    done = ck["epoch"] + (1 if ck["step"] else 0)
    if epochs < done:
        raise ValueError(f"{path} already trained {ck['epoch']} epochs" + (
            f" and part of epoch {done}" if ck["step"] else "") + f"; epochs={epochs} is the "
            f"total, counting those: pass epochs >= {done}")
    if (ck["scheduler"] is None) != (store.scheduler is None) or isinstance(
            store.scheduler, dict) and set(ck["scheduler"]) != set(store.scheduler):
        raise ValueError(f"{path} was saved {'with' if ck['scheduler'] else 'without'} a "
                         "scheduler (or with others); resume with the same setup")
    if (ck.get("scaler") is None) != (store.scaler is None):
        raise ValueError(f"{path} was saved {'with' if ck.get('scaler') else 'without'} "
                         "precision='fp16' (its GradScaler); resume with the same precision")
    saved = (ck.get("settings") or {}).get("columns") or {}
    given = (store.settings or {}).get("columns") or {}
    other = [f"{k} {given.get(k)} (last.pt: {saved.get(k)})" for k in {**saved, **given}
             if saved and given and saved.get(k) != given.get(k)]
    if other:
        raise ValueError(f"{path} has other values in its history's columns: {'; '.join(other)}"
                         ": resume with the same metrics, loss_fn and val, or a new directory")
    notes = [line for line in [_changed_settings(store, ck)] if line]
    with contextlib.suppress(KeyError, TypeError):  # optimizers that do not fit: refused next
        given, saved = _group_rates(store.optimizer), _group_rates(store.optimizer, ck["optimizer"])
        notes += [f"the optimizer was given {k} {a:g}; last.pt's {saved[k]:g} is used, so that "
                  "the run goes on as it was" for k, a in given.items() if saved[k] != a]
    ranks = len(ck["rng_ranks"] or [ck["rng"]])
    if ranks != store.world.size:  # each rank's rows and random state differ
        notes.append(f"last.pt was written by {ranks} processes, this run has "
                     f"{store.world.size}: it goes on, but no longer bit for bit")
    return notes


def _settings(train, train_data, batch_size, shuffle, drop_last, accumulate, precision,
              metrics, loss_fn, val, **_):
    """How the run trains, and what each history column is (each metric's function, the
    loss's type, the validation rows): compared on resume."""
    def name(fn):
        fn = getattr(fn, "fn", fn)  # a whole_set metric's function
        return getattr(fn, "builtin", None) or getattr(fn, "__qualname__", type(fn).__name__)
    columns = {"loss": name(type(loss_fn) if isinstance(loss_fn, torch.nn.Module) else loss_fn),
               **{k: fn if isinstance(fn, str) else name(fn) for k, fn in (metrics or {}).items()},
               **({} if val is None else {"val rows": _rows(val)})}
    return {"batch_size": getattr(train, "batch_size", batch_size), "shuffle": shuffle,
            "drop_last": drop_last, "accumulate": accumulate, "precision": precision,
            "rows": _rows(train), "batches": train_data.steps, "columns": columns}


def _rows(data):
    with contextlib.suppress(TypeError, AttributeError):
        return len(data[0] if _is_pair(data) else data if torch.is_tensor(data) else data.dataset)
    return None


def _group_rates(optimizer, states=None):
    """{"lr of group 1": r, ...} of every group of every optimizer (or its saved state)."""
    rates = {}
    for k, opt in _named(optimizer).items():
        groups = opt.param_groups if states is None else (states[k] if k else states)[
            "param_groups"]
        for i, g in enumerate(groups):
            rates[(f"lr_{k}" if k else "lr") + (f" of group {i}" if i else "")] = float(g["lr"])
    return rates


def _changed_settings(store, ck):
    """A line on the settings this run changes, or None; inside an epoch none may change
    (the rows trained, the order, the sums are the saved settings')."""
    saved, given = ck.get("settings"), store.settings
    if not isinstance(saved, dict) or given is None:  # written before settings were kept
        return None
    changed = [f"{k} {given[k]!r} (last.pt: {saved[k]!r})" for k in given
               if k in saved and saved[k] != given[k] and k != "columns"]
    if not changed:
        return None
    if ck["step"]:
        raise ValueError(f"{store.last_path} stopped inside epoch {ck['epoch'] + 1}, at batch "
                         f"{ck['step']}, and this run changes {', '.join(changed)}: resume with "
                         "the saved settings (an epoch cannot go on with other rows or order)")
    return (f"resuming after epoch {ck['epoch']} with {', '.join(changed)}: the epochs "
            "from here train so")


_NUMBER, _NONE = (int, float), type(None)
# What save_last writes, by key: the types a resume can work with.
_LAST_PT = {"model": dict, "optimizer": dict, "history": dict, "epoch": int, "step": int,
            "best": (*_NUMBER, _NONE), "best_epoch": (int, _NONE), "wait": int,
            "stopped": (str, _NONE), "scheduler": (dict, _NONE), "rng": dict,
            "rng_ranks": (list, _NONE), "steps": int, "monitor": str, "mode": str}
_LAST_PT_MID_EPOCH = {"meter": dict, "epoch_lr": dict, "epoch_time": _NUMBER, "rng_epoch": dict}
_METER = {"loss_sum": torch.Tensor, "loss_den": torch.Tensor, "counts": dict, "sums": dict,
          "losses": (torch.Tensor, _NONE), "outs": list, "ys": list}
_STOPPED = (None, "patience", "on_epoch_end")  # _Record.stopped's values


def _damage(ck, steps=None):
    """What is wrong with last.pt's dict ``ck``, or None when a resume can trust it."""
    def wrong_type(keys):
        for key, kind in keys.items():
            if key not in ck:
                return f"'{key}' is missing"
            v = ck[key]
            if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, _NUMBER)):
                return f"'{key}' is a {type(v).__name__} ({v!r:.40})"
        return None
    wrong = wrong_type(_LAST_PT)
    if wrong:
        return wrong
    epoch, step, history = ck["epoch"], ck["step"], ck["history"]
    if epoch < 0 or step < 0 or ck["wait"] < 0:
        return f"epoch {epoch}, step {step}, wait {ck['wait']}: expected counts >= 0"
    if step and wrong_type(_LAST_PT_MID_EPOCH):
        return wrong_type(_LAST_PT_MID_EPOCH) + " (needed in a mid-epoch snapshot)"
    if step and steps is not None and step > steps:  # == steps: saved at the last batch
        return f"'step' is {step}, not inside an epoch of {steps} batches"
    if step:
        meter = ck["meter"]
        for key, kind in _METER.items():
            if not isinstance(meter.get(key), kind):
                return f"the snapshot's meter has no {key!r} of type {kind}"
        losses = meter["losses"]
        held = [0 if losses is None else len(losses), len(meter["outs"]), len(meter["ys"])]
        if held[0] == 0 and losses is not None or max(held) > step:  # those since a look
            return (f"the snapshot's meter holds {held[0]} losses, {held[1]} outputs and "
                    f"{held[2]} targets for {step} steps")
    rngs = {"'rng'": ck["rng"], "'rng_epoch'": ck.get("rng_epoch") if step else None,
            **{f"'rng_ranks'[{i}]": r for i, r in enumerate(ck["rng_ranks"] or [])}}
    for where, rng in rngs.items():
        wrong = rng is not None and _rng_damage(rng)
        if wrong:
            return f"{where} {wrong}"
    if isinstance(ck["best"], float) and math.isnan(ck["best"]):
        return "'best' is nan (no epoch could ever improve on it)"
    if ck["stopped"] not in _STOPPED:
        return f"'stopped' is {ck['stopped']!r}; expected one of {_STOPPED}"
    opt = ck["optimizer"]
    if not all(isinstance(o, dict) and {"state", "param_groups"} <= set(o) for o in (
            [opt] if "param_groups" in opt else opt.values() or [{}])):
        return "'optimizer' is not an optimizer's state_dict (or a dict of them)"
    lengths = {k: len(v) if isinstance(v, list) else None for k, v in history.items()}
    if any(n != epoch for n in lengths.values()):
        return f"its history has columns of lengths {lengths} for epoch {epoch}"
    if not all(isinstance(x, _NUMBER) for v in history.values() for x in v):
        return "its history holds values other than numbers"
    if [float(e) for e in history.get("epoch", [])] != [float(e) for e in range(1, epoch + 1)]:
        return f"its history's epochs are not 1..{epoch}"
    if ck["best_epoch"] is not None and not 1 <= ck["best_epoch"] <= epoch:
        return f"best_epoch {ck['best_epoch']} is not one of epochs 1..{epoch}"
    return None


def _rng_damage(rng):
    """What keeps a saved random state from loading, tried on throwaway generators."""
    if not isinstance(rng, dict):
        return f"is a {type(rng).__name__}, not a random state"
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(_tuples(rng["python"]))
        for state in ([rng["batches"]] if "batches" in rng else []) + list(rng.get("loaders", [])):
            torch.Generator().set_state(state)
        np = sys.modules.get("numpy")
        if np is not None and "numpy" in rng:
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.RandomState().set_state(
                (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except KeyError as e:
        return f"has no {e.args[0]!r} random state"
    except (RuntimeError, TypeError, ValueError) as e:
        return f"does not load as a random state ({str(e)[:80]})"
    return None


def _check_optimizer_fits(optimizer, ckpt, path):
    """The same optimizers, groups and state shapes (torch.optim's: a wrong exp_avg would
    load, and fail at the first step)."""
    if "optimizer" not in ckpt:
        raise ValueError(f"{path} holds no optimizer state")
    one = not isinstance(optimizer, dict)
    states = {"": ckpt["optimizer"]} if one else ckpt["optimizer"]
    types = {"": ckpt.get("optimizer_type")} if one else ckpt.get("optimizer_type") or {}
    if set(states) != set(_named(optimizer)) or "param_groups" in states:
        raise ValueError(f"{path} holds the optimizers {sorted(states)}, this run has "
                         f"{sorted(_named(optimizer))}; resume with the same ones")
    for name, opt in _named(optimizer).items():
        saved, what = types.get(name), f"optimizer {name!r}" if name else "optimizer"
        if saved is not None and saved != type(opt).__name__:
            raise ValueError(f"{path} was saved with {what} {saved}, but "
                             f"{type(opt).__name__} was given; use the same optimizer type")
        sizes = [len(g["params"]) for g in states[name]["param_groups"]]
        if sizes != [len(g["params"]) for g in opt.param_groups]:
            raise ValueError(f"{path}: the saved {what} has parameter groups of sizes {sizes}, "
                             f"this one has {[len(g['params']) for g in opt.param_groups]}")
        if not type(opt).__module__.startswith("torch.optim") or type(opt).__name__ in (
                "Adafactor", "LBFGS", "SparseAdam"):  # their states are not the parameters'
            continue
        shape = {i: p.shape for sg, g in zip(states[name]["param_groups"], opt.param_groups)
                 for i, p in zip(sg["params"], g["params"])}
        for i, st in states[name].get("state", {}).items():
            for key, v in (st.items() if isinstance(st, dict) else ()):
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != shape.get(i, v.shape):
                    raise ValueError(f"{path} is damaged: the {what}'s {key!r} of parameter {i} "
                                     f"has shape {tuple(v.shape)}, the parameter "
                                     f"{tuple(shape[i])}; nothing was loaded from it")


class _DirLock:
    """One run per checkpoint directory: the OS's lock on ``DIR/.lock`` (flock, msvcrt),
    which goes with the process however it ends. Opened without following a link and
    changed only once known to be loops' own: anything else there is never touched."""
    NAME = ".lock"
    OURS = re.compile(r"(pid \d+ on \S*\n?)?")  # what loops writes there, or nothing yet
    NOT_OURS = ("; fit keeps its lock in a file of its own at that name, and never follows, "
                "changes or deletes another: move it, or choose another directory")

    def __init__(self, directory):
        self.path = os.path.join(directory, self.NAME)
        while True:
            f = self._open(directory)
            if not _try_lock(f):
                holder = ""
                with contextlib.suppress(OSError):  # Windows locks are mandatory: unreadable
                    f.seek(0)
                    holder = f.read().strip()
                f.close()
                raise ValueError(f"checkpoint directory {directory!r} is in use by another run "
                                 f"({holder or 'another process'}, holding {self.path}): wait "
                                 "for it to end, or choose another directory")
            try:  # locked: but is it still the file at that name (not one just removed)?
                same = os.path.samestat(os.fstat(f.fileno()), os.lstat(self.path))
            except OSError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        held = f.read(4096)
        if not self.OURS.fullmatch(held):
            f.close()
            raise ValueError(f"{self.path} is not loops' lock file (it holds {held[:60]!r})"
                             + self.NOT_OURS)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        _HELD_LOCKS.add(f)

    def _open(self, directory):
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(
            os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # NONBLOCK: a FIFO
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError:
            kind = ("a symbolic link" if os.path.islink(self.path) else "a directory"
                    if os.path.isdir(self.path) else None)
            if kind is None:
                raise
            raise ValueError(f"{self.path} is {kind}" + self.NOT_OURS) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{self.path} is not a regular file (a FIFO, socket or device)"
                             + self.NOT_OURS)
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "r+")

    def release(self):
        with contextlib.suppress(OSError):  # still locked: no other run can hold it now
            if os.path.samestat(os.fstat(self.file.fileno()), os.lstat(self.path)):
                os.unlink(self.path)  # ours, and still the file at that name
        _HELD_LOCKS.discard(self.file)
        self.file.close()  # closing drops the lock


# The lock files this process holds. A forked child (a DataLoader worker) closes its
# copies at once: a flock is held while any copy is open, and workers outlive a
# killed parent by seconds, which kept a restart out of the directory.
_HELD_LOCKS = set()


def _drop_inherited_locks():
    for f in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            f.close()  # this process's copy only: the parent's lock stays
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _try_lock(f):  # False if another holds it
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # on Windows another holds it; elsewhere no locks here: go on unlocked
        return os.name != "nt"
    return True

# --- end of checkpoint guards ------------------------------------------------


# --- optional: argument checks ------------------------------------------------
# What an entry point is given, a pass's first batch and what the seams return, checked
# before any step or file, saying what came and what was expected. Without this block
# good input runs the same, and bad input meets torch's (or Python's) own errors.

import tempfile  # noqa: E402  (the block's own imports: they go with it)
import warnings  # noqa: E402


def _check_fit(model, train, loss_fn, optimizer, *, epochs, val, batch_size, metrics, mode,
               checkpoint, resume, patience, min_delta, restore_best, scheduler,
               scheduler_interval, clip_grad_norm, device, seed, verbose, on_epoch_end,
               save_every, drop_last, precision, accumulate, on_batch_end, forward, train_step,
               val_fn, shuffle, **_):
    if train_step is not None:  # the user's own step: loops' step options have no place
        given = [f"{k}={v!r}" for k, v, unset in (
            ("precision", precision, None), ("accumulate", accumulate, 1),
            ("clip_grad_norm", clip_grad_norm, None)) if v != unset]
        if given:
            raise ValueError(f"{given[0]} is an option of loops' own step: do it inside your "
                             "train_step (autocast, several batches a step, clip_grad_norm_)")
        if metrics and val is None:
            raise ValueError("metrics= with train_step are computed in validation only: give "
                             "val= too, or return them from train_step")
    _check_training(model, loss_fn, optimizer, device=device, scheduler=scheduler,
                    scheduler_interval=scheduler_interval, precision=precision,
                    clip_grad_norm=clip_grad_norm, accumulate=accumulate,
                    own_step=train_step is not None, own_loss=forward is not None)
    for name, value in (("shuffle", shuffle), ("resume", resume), ("restore_best", restore_best)):
        _must(name, value, isinstance(value, bool), "True or False", TypeError)  # "no" is true
    for name, value, ok, expected in (
            ("epochs", epochs, _is_int(epochs), "an int >= 0"),
            ("seed", seed, seed is None or _is_int(seed) and seed < 2**63,
             "None or an int from 0 to 2**63 - 1"),
            ("patience", patience, patience is None or _is_int(patience, 1), "an int >= 1"),
            ("min_delta", min_delta, _is_number(min_delta) and 0 <= min_delta < math.inf,
             "a finite number >= 0"),
            ("verbose", verbose, _is_int(verbose) and verbose <= 2, "0, 1 or 2"),
            ("save_every", save_every, save_every is None or _is_number(save_every)
             and save_every >= 0, "a number of seconds >= 0 or None")):
        _must(name, value, ok, expected)
    _check_callables(train_step=train_step, on_epoch_end=on_epoch_end,
                     on_batch_end=on_batch_end, forward=forward, val_fn=val_fn)
    if (resume or save_every is not None) and checkpoint is None:
        raise ValueError("resume=True and save_every need checkpoint=DIR, where last.pt is")
    if scheduler_interval == "step" and any(isinstance(
            s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in _named(scheduler).values()):
        raise ValueError("ReduceLROnPlateau needs the monitor: use scheduler_interval='epoch'")
    if scheduler is not None and checkpoint is not None and all(
            hasattr(s, "state_dict") for s in _named(scheduler).values()):
        try:  # now, not after an epoch, when last.pt could not hold the scheduler's state
            _check_plain(_state_of(scheduler), "the scheduler's state_dict()")
        except TypeError as e:
            raise TypeError(f"{str(e).removeprefix('save_checkpoint: ')}: this run could not "
                            "be resumed; keep functions out of the scheduler, or drop "
                            "checkpoint=") from None
    if checkpoint is not None and getattr(train, "persistent_workers", False) and getattr(
            train, "num_workers", 0) > 0:  # their random state lives in their processes
        warnings.warn("the training DataLoader has persistent_workers=True: its workers' random "
                      "state cannot go into last.pt, so a resume draws other augmentations; "
                      "use persistent_workers=False for an exact one", RuntimeWarning, stacklevel=4)
    _check_metrics(metrics)
    _check_data(train, "train", batch_size, reused=epochs > 1, drop_last=drop_last,
                accumulate=accumulate, ranks=_world().size, alone=train_step is not None)
    _check_last_batch(model, train, batch_size, drop_last, _world().size)
    if val is not None:
        _check_data(val, "val", batch_size, reused=epochs > 1)
    _must("mode", mode, mode in ("auto", "min", "max"), "'auto', 'min' or 'max'")


def _check_train_epoch(model, data, loss_fn, optimizer, *, metrics, batch_size, shuffle,
                       generator, progress, drop_last, forward, **step):  # step: the options
    _check_training(model, loss_fn, optimizer, own_loss=forward is not None, **step)
    _must("shuffle", shuffle, isinstance(shuffle, bool), "True or False", TypeError)
    _check_callables(progress=progress, forward=forward)
    _check_metrics(metrics)
    _check_data(data, "data", batch_size, drop_last=drop_last, accumulate=step["accumulate"])


def _check_evaluate(model, data, loss_fn, *, metrics, batch_size, device, precision, forward):
    _check_model(model, device, precision)
    _check_callables(loss_fn=loss_fn, forward=forward)
    _check_metrics(metrics)
    _check_data(data, "data", batch_size)


def _check_predict(model, X_or_data, *, batch_size, device, precision, forward):
    _check_model(model, device, precision)
    _check_callables(forward=forward)
    _must("batch_size", batch_size, _is_int(batch_size, 1), "an int >= 1")
    data = X_or_data
    if _is_pair(data):
        if forward:
            _check_tensors(*data, "predict")
        data = data[0]
    if torch.is_tensor(data) and (data.dim() == 0 or len(data) == 0):
        raise ValueError(f"predict: expected a non-empty tensor of inputs, got shape "
                         f"{tuple(data.shape)}")
    if not hasattr(data, "__iter__"):
        raise TypeError(f"predict: expected a tensor X, a tuple (X, y) or an iterable of "
                        f"batches, got {type(data).__name__}")


def _check_lr_find(model, train, loss_fn, optimizer, *, start_lr, end_lr, steps, batch_size,
                   device, precision, forward):
    _check_training(model, loss_fn, optimizer, device=device, precision=precision,
                    own_loss=forward is not None)
    _check_callables(forward=forward)
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        _must(f"lr_find: {name}", value, _is_number(value) and 0 < value < math.inf,
              "a positive number")
    if end_lr <= start_lr:
        raise ValueError(f"lr_find: end_lr ({end_lr:g}) must be above start_lr ({start_lr:g})")
    _must("steps", steps, _is_int(steps, 2), "an int >= 2")
    _check_data(train, "train", batch_size, reused=True)


# what an entry point is given

def _check_training(model, loss_fn, optimizer, *, device, scheduler=None,
                    scheduler_interval="epoch", clip_grad_norm=None, precision=None,
                    accumulate=1, own_step=False, own_loss=False):
    """What every entry point that trains is given; with ``own_step`` (train_step) or
    ``own_loss`` (forward's loss) no loss_fn, and with ``own_step`` a dict of optimizers."""
    _check_model(model, device, precision)
    if not (callable(loss_fn) or loss_fn is None and (own_step or own_loss)):
        raise TypeError(f"loss_fn must be callable (or None, with a forward that returns the "
                        f"model's own loss), got {type(loss_fn).__name__}")
    if isinstance(optimizer, dict) and not own_step:
        raise TypeError("optimizer is a dict: several optimizers need your own step, "
                        "fit(..., train_step=...), which steps each of them")
    for name, opt in (optimizer if isinstance(optimizer, dict) and optimizer else {
            "": optimizer}).items():
        if not isinstance(opt, torch.optim.Optimizer) or not isinstance(name, str):
            raise TypeError(f"optimizer{f'[{name!r}]' if name else ''} must be a "
                            f"torch.optim.Optimizer, got {type(opt).__name__}")
        own = {id(p) for m in (model, loss_fn) if isinstance(m, torch.nn.Module)
               for p in m.parameters()}
        given = [p for g in opt.param_groups for p in g["params"]]
        if own and given and not any(id(p) in own for p in given):  # it would change nothing
            raise ValueError(f"the optimizer holds {len(given)} parameter tensors, none of "
                             f"them the model's ({type(_unwrap(model)).__name__}): it was made "
                             "for another model. Create it from this one: optimizer = "
                             f"torch.optim.{type(opt).__name__}(model.parameters(), ...)")
    _must("scheduler_interval", scheduler_interval, scheduler_interval in ("epoch", "step"),
          "'epoch' or 'step'")
    if isinstance(scheduler, dict) and set(scheduler) != set(_named(optimizer)):
        raise ValueError(f"scheduler is a dict with the keys {sorted(scheduler)}; expected one "
                         f"scheduler per optimizer, keyed like them: {sorted(_named(optimizer))}")
    for name, sched in _named(scheduler).items():
        if not hasattr(sched, "step"):
            raise TypeError(f"scheduler{f'[{name!r}]' if name else ''} must have a step() "
                            f"method, got {type(sched).__name__}")
    _must("clip_grad_norm", clip_grad_norm, clip_grad_norm is None or _is_number(
        clip_grad_norm) and clip_grad_norm > 0, "a positive number or None")  # nan too
    _must("accumulate", accumulate, _is_int(accumulate, 1), "an int >= 1")


def _check_model(model, device, precision=None):
    """A module on ``device`` (the model's device trains: nothing is moved)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    here = model_device(model)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a device; expected e.g. 'cpu' or "
                             "'cuda'") from None
        name = str(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but this torch sees no CUDA GPU (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); use "
                             "device='cpu'")
        if device.type == "cpu" and device.index not in (None, 0):  # torch would ignore it
            raise ValueError(f"device={name!r}: the CPU is one device, 'cpu'")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but this torch sees "
                             f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
        if here.type != device.type or None not in (device.index, here.index) and (
                here.index != device.index):
            raise ValueError(f"the model's parameters are on {here} but device={name!r}: move "
                             f"it first (model.to({name!r})), then create the optimizer")
    if precision is not None:
        _must("precision", precision, precision in ("bf16", "fp16"), "None (fp32), 'bf16' or "
              "'fp16'")
        _block("mixed precision", "_check_mixed_precision", f"precision={precision!r}")(
            precision, here)


def _check_metrics(metrics):
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict {{'name': fn or 'accuracy', ...}}, got "
                        f"{type(metrics).__name__}")
    known = _stats(0.5)
    for key, fn in metrics.items():
        if not isinstance(key, str) or not key or key.startswith("val_") or key in (
                "loss", *_NOT_VALUES):
            raise ValueError(f"metrics: key {key!r} is not allowed; use a name other than "
                             f"'loss', {', '.join(map(repr, _NOT_VALUES))}, not 'val_...'")
        if isinstance(fn, str) and fn not in known and fn not in _BLOCK_OF:
            raise ValueError(f"metrics[{key!r}]: unknown metric {fn!r}; expected one of "
                             f"{', '.join(known)} or a function (y_pred, y) -> tensor")
        if not (isinstance(fn, (str, _WholeSet)) or callable(fn)):
            raise TypeError(f"metrics[{key!r}]: expected a function (y_pred, y) -> tensor or "
                            f"the name of a built-in metric, got {type(fn).__name__}")


def _check_whole_set(fn):
    if not callable(fn):
        raise TypeError(f"whole_set takes a function (y_pred, y) -> scalar, got "
                        f"{type(fn).__name__}")


def _check_data(data, what, batch_size, *, reused=False, drop_last=False, accumulate=1,
                ranks=1, alone=False):
    """(X, y) tensors (X alone, if ``alone``), or batches an epoch can iterate again."""
    _must("batch_size", batch_size, _is_int(batch_size, 1), "an int >= 1")
    _must("drop_last", drop_last, isinstance(drop_last, bool), "True or False", TypeError)
    if _is_pair(data) or alone and torch.is_tensor(data):
        X, y = data if _is_pair(data) else (data, data)
        _check_tensors(X, y, what)
        if drop_last and len(X) < ranks * batch_size * accumulate:
            raise ValueError(f"{what}: drop_last=True with {len(X)} rows and batch_size "
                             f"{batch_size}{f' x accumulate {accumulate}' * (accumulate > 1)} "
                             f"leaves no batch; expected >= {ranks * batch_size * accumulate} rows")
    elif torch.is_tensor(data) or isinstance(data, tuple) or not hasattr(data, "__iter__"):
        raise TypeError(f"{what}: expected a tuple (X, y) of two tensors or an iterable of "
                        f"(xb, yb) batches (a list, a DataLoader), got {_describe(data)}")
    elif isinstance(data, list) and len(data) == 2 and all(map(torch.is_tensor, data)):
        raise TypeError(f"{what}: got a list of two tensors; pass the tensors as a tuple "
                        "(X, y) (a list is read as a list of (xb, yb) batches)")
    elif drop_last:
        raise ValueError(f"{what}: drop_last=True is for (X, y) tensors; a DataLoader drops "
                         "its short last batch with DataLoader(..., drop_last=True)")
    elif reused and hasattr(data, "__next__"):  # not iter(data): it would start the
        # DataLoader's workers and draw its seed from the random state
        raise TypeError(f"{what}: got a one-shot iterator ({type(data).__name__}), which would "
                        "be empty after the first epoch; pass a list or a DataLoader instead")
    else:
        with contextlib.suppress(TypeError):  # an IterableDataset has no length
            if len(data) == 0:
                raise ValueError(f"{what}: the dataset is empty (0 batches); expected at "
                                 "least one")


def _check_last_batch(model, train, batch_size, drop_last, ranks):
    """BatchNorm cannot train on a batch of one row (torch: "Expected more than 1 value per
    channel", after a whole epoch's work): refused now, where the data's last batch has one."""
    norms = [type(m).__name__ for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    rows = size = 0
    if _is_pair(train):
        rows, size = len(train[0]), ranks * batch_size
    elif ranks == 1 and not getattr(train, "drop_last", True):  # a DataLoader that keeps it
        with contextlib.suppress(TypeError, AttributeError):
            rows, size = len(train.dataset), train.batch_size or 0
    if norms and not drop_last and size and rows % size // ranks == 1:
        raise ValueError(f"the last training batch would hold 1 row ({rows} rows in batches of "
                         f"{size}), and {norms[0]} cannot train on one row: pass drop_last=True "
                         "(to the DataLoader, for one), or another batch size")


def _check_tensors(X, y, what):
    if not (torch.is_tensor(X) and torch.is_tensor(y)):
        raise TypeError(f"{what}: expected two tensors (X, y), got "
                        f"({type(X).__name__}, {type(y).__name__})")
    if X.dim() == 0 or y.dim() == 0 or len(X) != len(y):
        raise ValueError(f"{what}: X and y must have the same first dimension, got shapes "
                         f"{tuple(X.shape)} and {tuple(y.shape)}")
    if len(X) == 0:
        raise ValueError(f"{what}: the dataset is empty (0 rows); expected at least one row")


def _check_monitor(monitor, keys, *, has_val, later):
    """The monitor names a value of the history (``later``: train_step's, val_fn's)."""
    if not isinstance(monitor, str) or monitor in _NOT_VALUES or monitor.startswith("lr_") or (
            monitor not in keys and not later):
        raise ValueError(f"monitor={monitor!r} names no value of the history; expected one of "
                         f"{', '.join(k for k in keys if k not in _NOT_VALUES and k[:3] != 'lr_')}"
                         + ("" if has_val or not str(monitor).startswith("val_")
                            else " (val_ values need val=)"))


def _check_writable(path):  # created, and proved writable with a probe file
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"checkpoint directory {path!r} cannot be written: {e.strerror or e}; "
                         "expected a writable directory path") from None


_PLAIN = (bool, int, float, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(value, where):
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif not (torch.is_tensor(value) or isinstance(value, _PLAIN)):
        raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; checkpoints hold "
                        "only tensors and plain values, which weights_only=True loads")


# what comes back from the model, the loss and the seams

_SAME_SHAPE_LOSSES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss)


def _try_first_val_batch(model, val, seam, stats):
    """The first validation batch through model, loss and metrics before training: wrong
    shapes fail now, not after an epoch (not a DataLoader: it would start its workers)."""
    if not isinstance(val, _TensorSource):
        return
    first = _TensorSource(val.X[:val.batch_size], val.y[:val.batch_size],
                          batch_size=val.batch_size, device=val.device)
    try:
        _read([_evaluate_pass(_unwrap(model), first, seam, stats)])
    except FloatingPointError:
        return  # a NaN is the epoch's validation pass to report, with its batch
    except Exception as e:
        message = (f"val: the first validation batch, run through the model before training "
                   f"as a check, failed: {e}")
        try:
            error = type(e)(message)
        except Exception:  # an exception type that takes other arguments
            error = ValueError(message)
        raise error from e


def _check_first_batch(meter, out, y):
    """A pass's first batch: shapes MSELoss would broadcast ((N, 1) with (N,): an (N, N)
    mean) are refused, and each metric is tried, so that one that fails names itself."""
    if isinstance(meter.loss_fn, _SAME_SHAPE_LOSSES) and out.shape != y.shape:
        raise ValueError(f"{type(meter.loss_fn).__name__} got outputs of shape "
                         f"{tuple(out.shape)} and targets of shape {tuple(y.shape)}, which "
                         "torch would broadcast to a wrong loss: give both the same shape "
                         "(y.reshape(-1, 1), or out.squeeze(-1))")
    for k, st in meter.stats.items() if not meter.tried else ():
        try:
            _metric_sums({k: st}, [out], [y], meter.dtype)
        except Exception as e:
            raise ValueError(f"metric {k!r} failed on a batch (outputs: {_describe(out)}; "
                             f"targets: {_describe(y)}): {e}") from e


def _refuse_metric_value(v):
    raise ValueError(f"returned shape {tuple(v.shape)}; expected a scalar tensor, the batch's "
                     "mean")


def _check_pair(out):
    raise TypeError(f"forward returned {_describe(out)}; expected a pair (y_pred, y): "
                    "the outputs, and the targets the loss and metrics compare them with")


def _check_output(y_pred, forward, batch=None, cause=None):
    """A model returning a tuple or a ModelOutput: the error names forward=, with a lambda."""
    if forward is None and not torch.is_tensor(y_pred):
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        call = "model(**batch[0])" if isinstance(inputs, Mapping) else "model(batch[0])"
        take = ".logits" if hasattr(y_pred, "logits") else "[0]"
        raise TypeError(f"the model returned {_describe(y_pred)}; loops needs one tensor of "
                        "outputs for the loss and the metrics: pass forward=, e.g. forward="
                        f"lambda model, batch: ({call}{take}, batch[1]) to take its "
                        "outputs (README, 'Make it yours')") from cause


def _check_predicted(outs, forward):
    if not outs:
        raise ValueError("predict: the data yielded no batches; expected at least one")
    _check_output(outs[0], forward)


def _refuse_loss(loss):
    if loss is None:
        raise TypeError("no loss to train on: loss_fn is None, and forward returned (y_pred, "
                        "y); pass a loss_fn, or return the model's own loss third: (y_pred, y, "
                        "loss), e.g. (out.logits, batch['labels'], out.loss)")
    if not torch.is_tensor(loss):
        raise TypeError(f"loss_fn returned a {type(loss).__name__}; expected a scalar tensor "
                        "(a Python number has no gradient: compute the loss with torch "
                        "operations, e.g. torch.nn.functional.mse_loss)")
    raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; expected "
                     "a scalar (use reduction='mean', the default of torch.nn losses)")


def _refuse_batch(batch, what):
    """A batch that is not an (xb, yb) pair (a dict would unpack to its keys)."""
    kind = (f"a {type(batch).__name__} with keys {list(batch)[:4]}"
            if isinstance(batch, Mapping) else _describe(batch))
    example = ("(out := model(**batch)).logits, batch['labels'], out.loss" if isinstance(
        batch, Mapping) and "labels" in batch else "model(batch['x']), batch['y']")
    raise TypeError(f"{what}: a batch is {kind}; expected an (inputs, targets) pair. Pass "
                    f"forward=, which reads a batch of any shape (forward=lambda model, batch: "
                    f"({example}); README, 'Make it yours'), or return (x, y) from the "
                    "Dataset's __getitem__")


def _check_step_values(values, names=None, step=None, *, monitor=None):
    """train_step's values: {name: scalar tensor}, the first step's ``names`` later on."""
    at = "" if step is None else f" at step {step} (as on_batch_end counts)"
    if not isinstance(values, dict) or not values:
        raise TypeError(f"train_step returned {_describe(values)}{at}; expected a dict "
                        "{name: scalar tensor} of the batch's means, e.g. {'loss': loss}")
    if names is not None and values.keys() != set(names):
        raise ValueError(f"train_step returned {list(values)}{at}; its first step returned "
                         f"{names}: return the same names at every step")
    for k, v in values.items():
        if not isinstance(k, str) or k in _NOT_VALUES or k.startswith(("val_", "lr_")):
            raise ValueError(f"train_step returned the name {k!r}; use names that are not "
                             f"{', '.join(_NOT_VALUES)} and start neither with 'val_' nor 'lr_'")
        if not (torch.is_tensor(v) and v.numel() == 1):
            raise ValueError(f"train_step returned {k!r}: {_describe(v)}{at}; expected a "
                             "scalar tensor, the batch's mean (loss.detach() is fine)")
    if monitor is not None and not monitor.startswith("val_") and monitor not in values:
        raise ValueError(f"train_step returned {list(values)}, not {monitor!r}, the monitor: "
                         "return it too, or pass monitor= one of those (and mode=)")


def _check_val_values(values, logs):
    if not isinstance(values, dict) or not all(
            isinstance(k, str) and _is_number(v) for k, v in values.items()):
        raise TypeError(f"val_fn returned {values!r:.80}; expected a dict {{name: float}} "
                        "(a tensor's value with .item())")
    taken = [k for k in values if k in logs or k in _NOT_VALUES or k.startswith("lr_")]
    if taken:
        raise ValueError(f"val_fn returned {taken[0]!r}, a name the epoch's values have "
                         f"already ({', '.join(logs)}, lr, time, best_epoch): name yours otherwise")


def _check_logs(logs, record):
    if list(logs) != list(record.history):
        raise ValueError(f"epoch {logs['epoch']} has the values {list(logs)}; the run "
                         f"records {list(record.history)}: train_step and val_fn return the "
                         "same names each time")
    if record.monitor not in logs:
        raise ValueError(f"the monitor {record.monitor!r} is none of the epoch's values "
                         f"({', '.join(k for k in logs if k not in _NOT_VALUES)}): pass "
                         "monitor= one of them")


# what the checks share

def _must(name, value, ok, expected, error=ValueError):
    if not ok:
        raise error(f"{name} must be {expected}, got {value!r}")


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_callables(**named):
    for name, fn in named.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def _describe(x):
    return f"a tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else (
        f"a {type(x).__name__} of {len(x)} ({', '.join(type(v).__name__ for v in x[:4])})"
        if isinstance(x, (tuple, list)) else f"a {type(x).__name__}")

# --- end of argument checks ---------------------------------------------------
