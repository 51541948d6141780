"""The frameworks bench.py compares with, each driven the way its own tutorials drive it.

Every runner takes the workload ``w`` (loss, metric, batch, epochs), a fresh
torch ``model`` and its Adam ``opt`` (lr 1e-3), the train and test tensors,
and returns the seconds of the training call alone: the data loaders and the
framework's objects are built before the clock starts. Each reshuffles the
training set every epoch, evaluates the test set after every epoch, and
collects the loss and the workload's metric (accuracy or mean absolute
error), as fit does.

A runner is offered only when its package imports; none is ever a
requirement. Keras 3 builds the same layer sizes from its own layers (how
Keras is written), on its torch backend.
"""
import contextlib
import io
import logging
import os
import time
import warnings

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loaders(w, train, test):
    """A shuffling training loader and one-batch test loader, as the tutorials build them."""
    data = torch.utils.data
    return (data.DataLoader(data.TensorDataset(*train), batch_size=w["batch"], shuffle=True),
            data.DataLoader(data.TensorDataset(*test), batch_size=len(test[0])))


def _mean_metric(w):
    """The workload's metric as a per-batch mean, for frameworks that average batch values."""
    metric = w["metric"][2]
    return lambda out, y: metric(out, y).float() / len(y)


def ignite(w, model, opt, train, test, device):
    from ignite.engine import create_supervised_evaluator, create_supervised_trainer, Events
    from ignite.metrics import Accuracy, Loss, MeanAbsoluteError
    train_loader, test_loader = _loaders(w, train, test)
    binary = w["metric"][1] == "binary_accuracy"
    metric = (MeanAbsoluteError() if w["metric"][0] == "mae" else
              Accuracy(output_transform=(lambda o: ((o[0] > 0.5).float(), o[1])) if binary
                       else (lambda o: o)))
    trainer = create_supervised_trainer(model, opt, w["loss"], device=device)
    evaluator = create_supervised_evaluator(model, {"m": metric, "loss": Loss(w["loss"])},
                                            device=device)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run(test_loader))
    t0 = time.perf_counter()
    trainer.run(train_loader, max_epochs=w["epochs"])
    _sync(device)
    return time.perf_counter() - t0


def lightning(w, model, opt, train, test, device):
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    for name in ("lightning.pytorch", "pytorch_lightning"):  # its banners and tips
        logging.getLogger(name).setLevel(logging.ERROR)
    loss_fn, metric = w["loss"], _mean_metric(w)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            xb, yb = batch
            out = self.net(xb)
            loss = loss_fn(out, yb)
            self.log("loss", loss, on_step=False, on_epoch=True)
            self.log("metric", metric(out, yb), on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, _):
            xb, yb = batch
            out = self.net(xb)
            self.log("val_loss", loss_fn(out, yb))
            self.log("val_metric", metric(out, yb))

        def configure_optimizers(self):
            return opt

    train_loader, test_loader = _loaders(w, train, test)
    trainer = pl.Trainer(max_epochs=w["epochs"], accelerator=device.type, devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer.fit(Module(), train_loader, test_loader)
    _sync(device)
    return time.perf_counter() - t0


def skorch(w, model, opt, train, test, device):
    from skorch import NeuralNet
    from skorch.callbacks import EpochScoring
    from skorch.dataset import Dataset
    from skorch.helper import predefined_split
    metric = w["metric"][2]

    def score(net, X, y):  # on the validation predictions skorch has cached
        out = net.forward(X)
        return float(metric(out, torch.as_tensor(y).to(out.device))) / len(y)
    net = NeuralNet(model, w["loss"], optimizer=torch.optim.Adam, lr=1e-3,
                    max_epochs=w["epochs"], batch_size=w["batch"],
                    iterator_train__shuffle=True, train_split=predefined_split(Dataset(*test)),
                    callbacks=[EpochScoring(score, name="metric", lower_is_better=False)],
                    device=device.type, verbose=0)
    net.initialize()
    t0 = time.perf_counter()
    net.partial_fit(*train)
    _sync(device)
    return time.perf_counter() - t0


def poutyne(w, model, opt, train, test, device):
    from poutyne import Model
    metric = _mean_metric(w)
    metric.__name__ = w["metric"][0]
    pm = Model(model, opt, w["loss"], batch_metrics=[metric], device=device)
    train_loader, test_loader = _loaders(w, train, test)
    t0 = time.perf_counter()
    pm.fit_generator(train_loader, test_loader, epochs=w["epochs"], verbose=False)
    _sync(device)
    return time.perf_counter() - t0


def keras(w, model, opt, train, test, device):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    if keras.backend.backend() != "torch":
        raise RuntimeError("keras was imported with another backend; set KERAS_BACKEND=torch")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layers = [keras.Input(shape=(linears[0].in_features,))]
    for i, lin in enumerate(linears):
        last = i == len(linears) - 1
        layers.append(keras.layers.Dense(lin.out_features, activation=None if last else "relu"))
    loss, metric = {"binary_accuracy": ("binary_crossentropy", "binary_accuracy"),
                    "accuracy": (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                 "sparse_categorical_accuracy"),
                    "mae": ("mse", "mae")}[w["metric"][1]]
    if w["metric"][1] == "binary_accuracy":
        layers.append(keras.layers.Activation("sigmoid"))
    km = keras.Sequential(layers)
    km.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=[metric])
    X, y = (t.cpu().numpy() for t in train)
    Xt, yt = (t.cpu().numpy() for t in test)
    t0 = time.perf_counter()
    km.fit(X, y, batch_size=w["batch"], epochs=w["epochs"], validation_data=(Xt, yt),
           shuffle=True, verbose=0)
    return time.perf_counter() - t0


_PACKAGES = {"ignite": ("ignite",), "lightning": ("lightning", "pytorch_lightning"),
             "skorch": ("skorch",), "poutyne": ("poutyne",), "keras": ("keras",)}


def available():
    """name -> runner, for each framework whose package imports here."""
    import importlib.util
    found = {}
    for name, modules in _PACKAGES.items():
        if any(importlib.util.find_spec(m) is not None for m in modules):
            found[name] = globals()[name]
    return found
