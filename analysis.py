"""See inside a trained classifier from the terminal: mistakes, representations, weights.

The views the digit and Fashion-MNIST tutorials draw with matplotlib and
TensorBoard, as text: one function per view, taking a model and data and
returning data or a string. Needs torch, ``loops.py`` and ``plots_ascii.py``.

    >>> import torch, analysis
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> [m["index"] for m in analysis.top_mistakes(probs, torch.tensor([0, 0, 1]), 2)]
    [1, 2]
"""
import torch

import loops
import plots_ascii

__all__ = ["predictions", "confusion_view", "top_mistakes", "mistakes_view", "activations",
           "pca_2d", "pca_view", "weights_view", "ConfidenceTracker", "imagine"]


def predictions(model, data, *, batch_size=256, device=None):
    """Outputs for a whole set and what follows from them, all on the CPU:
    ``outputs`` (logits), ``probs`` (softmax), ``labels`` (arg-max) and
    ``confidence`` (the largest probability of each row)."""
    outputs = loops.predict(model, data, batch_size=batch_size, device=device)
    probs = outputs.softmax(-1)
    confidence, labels = probs.max(-1)
    return {"outputs": outputs, "probs": probs, "labels": labels, "confidence": confidence}


def confusion_view(pred_labels, y, num_classes, *, class_names=None, title="confusion matrix"):
    """The confusion matrix (rows true, columns predicted) and each class's accuracy."""
    cm = loops.confusion_matrix(pred_labels, y, num_classes)
    names = [str(c) for c in (class_names or range(num_classes))]
    table = plots_ascii.matrix(cm.tolist(), row_labels=names, col_labels=names,
                               title=f"{title} (rows: true, columns: predicted)")
    right, total = cm.diagonal().tolist(), cm.sum(1).tolist()
    per_class = {n: 100.0 * r / t if t else 0.0 for n, r, t in zip(names, right, total)}
    counts = {n: (f"{100.0 * r / t:.0f}% ({r}/{t})" if t else "no samples")
              for n, r, t in zip(names, right, total)}
    overall = sum(right) / max(1, sum(total))
    bars = plots_ascii.bar_chart(per_class, width=40, labels=counts,
                                 title=f"accuracy per class (overall {overall:.1%} of "
                                       f"{sum(total)})")
    return table + "\n\n" + bars


def top_mistakes(probs, y, n=8):
    """The ``n`` wrong predictions the model was surest of, most confident first:
    dicts of index, true label, its probability, predicted label, its probability."""
    probs, y = probs.cpu(), y.cpu().reshape(-1).long()
    confidence, pred = probs.max(-1)
    wrong = (pred != y).nonzero().reshape(-1)
    order = wrong[confidence[wrong].argsort(descending=True, stable=True)][:n]
    return [{"index": int(i), "true": int(y[i]), "p_true": float(probs[i, y[i]]),
             "pred": int(pred[i]), "p_pred": float(confidence[i])} for i in order]


def _small(img, factor):
    """A (H, W) image averaged over factor x factor blocks (28 x 28 -> 14 x 14)."""
    img = img.reshape(1, 1, *img.shape[-2:]).float()
    return torch.nn.functional.avg_pool2d(img, factor)[0, 0] if factor > 1 else img[0, 0]


def _grid(images, captions, *, per_row, shrink):
    blocks = [plots_ascii.image(_small(img, shrink).tolist()) for img in images]
    width = max(len(line) for b in blocks for line in b.splitlines())
    blocks = ["\n".join(line[:width].ljust(width) for line in caption.split("\n")) + "\n" + block
              for caption, block in zip(captions, blocks)]
    rows = [plots_ascii.side_by_side(blocks[i:i + per_row], gap=3)
            for i in range(0, len(blocks), per_row)]
    return "\n\n".join(rows)


def mistakes_view(X, probs, y, n=6, *, per_row=3, shrink=2, class_names=None):
    """The most confident mistakes drawn side by side, each captioned with the true label
    and the predicted one, each with its probability ('true 4 (0.05)' over 'said 9 (0.93)')."""
    found = top_mistakes(probs, y, n)
    if not found:
        return "no mistakes"
    name = (lambda c: class_names[c]) if class_names else str
    captions = [f"true {name(m['true'])} ({m['p_true']:.2f})\nsaid {name(m['pred'])} "
                f"({m['p_pred']:.2f})" for m in found]
    return _grid([X[m["index"]] for m in found], captions, per_row=per_row, shrink=shrink)


def activations(model, layer, data, *, batch_size=256, device=None):
    """What ``layer`` (a submodule of ``model``) outputs for every row of ``data``, (N, ...),
    captured by a forward hook that is removed afterwards."""
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output:
                                         captured.append(output.detach()))
    try:
        loops.predict(model, data, batch_size=batch_size, device=device)
    finally:
        handle.remove()
    return torch.cat(captured).cpu()


def pca_2d(points):
    """The first two principal components of (N, D) points: (N, 2) coordinates, and the
    fraction of the variance each explains. Signs are fixed so that every component's
    largest loading is positive, so the picture does not flip between runs."""
    X = points.reshape(len(points), -1).double()
    X = X - X.mean(0)
    _, s, vt = torch.linalg.svd(X, full_matrices=False)
    vt = vt[:2]
    signs = vt.gather(1, vt.abs().argmax(1, keepdim=True)).sign()
    vt = vt * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = s.square()
    explained = (var[:2] / var.sum().clamp_min(1e-300)).tolist()
    coords = X @ vt.T
    if coords.shape[1] < 2:  # one-dimensional input: a second axis of zeros
        coords = torch.cat([coords, torch.zeros(len(coords), 1, dtype=coords.dtype)], 1)
        explained += [0.0]
    return coords.float(), explained


def pca_view(points, labels, *, title, max_points=600, width=72, height=24):
    """A 2-D PCA scatter of the points, each drawn as its label (the class digit)."""
    coords, explained = pca_2d(points)
    labels = labels.reshape(-1)
    if len(coords) > max_points:  # a readable sample, the same every time
        keep = torch.linspace(0, len(coords) - 1, max_points).round().long()
        coords, labels = coords[keep], labels[keep]
    head = (f"{title}: PCA, axes explain {explained[0]:.0%} and {explained[1]:.0%} of the "
            "variance")
    return plots_ascii.scatter(coords[:, 0].tolist(), coords[:, 1].tolist(),
                               labels=[str(int(v)) for v in labels], width=width,
                               height=height, title=head)


def weights_view(linear, *, shape=(28, 28), n=9, per_row=3, shrink=2):
    """The first ``n`` rows of a Linear layer's weight, each reshaped to an image: what
    each unit of the first layer looks for (scaled from its minimum to its maximum)."""
    w = linear.weight.detach().cpu()
    return _grid([row.reshape(shape) for row in w[:n]], [f"unit {i}" for i in range(min(n, len(w)))],
                 per_row=per_row, shrink=shrink)


class ConfidenceTracker:
    """An ``on_epoch_end`` hook that records, at the first and at the latest epoch, each
    image's confidence (its largest probability) and the probability given to its true
    label; ``view()`` draws them as histograms, first above last."""

    def __init__(self, model, data, *, device=None):
        self.model, self.data, self.device = model, data, device
        self.first = self.last = None

    def __call__(self, epoch, logs):
        p = predictions(self.model, self.data, device=self.device)
        y = self.data[1].cpu().reshape(-1).long()
        record = {"epoch": epoch, "confidence": p["confidence"],
                  "p_true": p["probs"].gather(1, y[:, None]).squeeze(1)}
        if self.first is None:
            self.first = record
        self.last = record

    def view(self, bins=10, width=40):
        """The histograms, first epoch above the last, on the same bins over [0, 1] and
        the same bar scale, so that they compare bar for bar."""
        if self.first is None:
            return "no epoch recorded"
        parts = []
        for key, what in (("confidence", "largest probability"),
                          ("p_true", "probability of the true label")):
            recs = (self.first, self.last)
            top = max(_largest_bin(r[key].tolist(), bins) for r in recs)
            for rec in recs:
                values = rec[key]
                parts.append(plots_ascii.histogram(
                    values.tolist(), bins=bins, width=width, value_range=(0.0, 1.0), top=top,
                    title=f"{what}, epoch {rec['epoch']} (mean {values.mean():.3f})"))
        return "\n\n".join(parts)


def _largest_bin(values, bins):
    """The largest count of ``bins`` equal bins over [0, 1], binned as plots_ascii.histogram."""
    counts = [0] * bins
    for v in values:
        if 0.0 <= v <= 1.0:
            counts[min(int(v / (1.0 / bins)), bins - 1)] += 1
    return max(counts)


def _device_of(model):
    """The device of the model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def imagine(model, target, *, shape=(1, 1, 28, 28), steps=200, lr=0.1, seed=0, device=None):
    """An input the model takes for class ``target``: start from noise and follow the
    gradient of that class's log-probability, keeping pixels in [0, 1]. Returns the
    image and the probability the model gives it."""
    device = device or _device_of(model)
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1).to(device).requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            loss = -model(x).log_softmax(-1)[0, target]
            (x.grad,) = torch.autograd.grad(loss, [x])  # the input's gradient only, not the weights'
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        with torch.no_grad():
            p = model(x).softmax(-1)[0, target].item()
    finally:
        model.train(was_training)
    return x.detach().cpu().reshape(shape[-2:]), p
