"""See inside a trained classifier from the terminal: mistakes, representations, weights.

The views the digit and Fashion-MNIST tutorials draw with matplotlib and
TensorBoard, as text: one function per view, taking a model and data and
returning data or a string. Needs torch, ``loops.py`` and ``plots_ascii.py``.

    >>> import torch, analysis
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> [m["index"] for m in analysis.top_mistakes(probs, torch.tensor([0, 0, 1]), 2)]
    [1, 2]
"""
import math
import warnings

import torch

import loops
import plots_ascii

__all__ = ["predictions", "confusion_view", "top_mistakes", "mistakes_view", "activations",
           "pca_2d", "pca_view", "tsne_2d", "tsne_view", "weights_view", "ConfidenceTracker",
           "imagine", "summary"]


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
    """Images side by side, ``per_row`` to a row, each under its caption (never cut: a
    caption wider than its image widens the column). ``shrink`` None: 28 x 28 images
    drawn at half size, smaller ones (8 x 8 digits) as they are."""
    if shrink is None:
        shrink = max(1, images[0].shape[-1] // 14) if len(images) else 1
    blocks = [plots_ascii.image(_small(img, shrink).tolist()) for img in images]
    width = max(len(line) for b in [*blocks, *captions] for line in b.splitlines())
    blocks = ["\n".join(line.ljust(width) for line in caption.split("\n")) + "\n" + block
              for caption, block in zip(captions, blocks)]
    rows = [plots_ascii.side_by_side(blocks[i:i + per_row], gap=3)
            for i in range(0, len(blocks), per_row)]
    return "\n\n".join(rows)


def mistakes_view(X, probs, y, n=6, *, per_row=3, shrink=None, class_names=None):
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


def _as_points(points):
    """A tensor as it is (detached); lists and arrays as float64 (a list's 1e200 would not
    fit torch's default float32)."""
    if torch.is_tensor(points):
        return points.detach()
    return torch.as_tensor(points, dtype=torch.float64)


def _labelled(points, labels, who):
    """(points as (N, D), labels as (N,)); a ValueError unless there is one label a point."""
    points, labels = _as_points(points), torch.as_tensor(labels).reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"{who}: {len(points)} points and {len(labels)} labels; expected "
                         "one label per point")
    return points.reshape(len(points), -1), labels


def pca_view(points, labels, *, title, max_points=600, width=None, height=24):
    """A 2-D PCA scatter of the points, each drawn as its label (the class digit)."""
    points, labels = _labelled(points, labels, "pca_view")
    coords, explained = pca_2d(points)
    if len(coords) > max_points:  # a readable sample, the same every time
        keep = torch.linspace(0, len(coords) - 1, max_points).round().long()
        coords, labels = coords[keep], labels[keep]
    head = (f"{title}: PCA, axes explain {explained[0]:.0%} and {explained[1]:.0%} of the "
            "variance")
    return plots_ascii.scatter(coords[:, 0].tolist(), coords[:, 1].tolist(),
                               labels=[str(int(v)) for v in labels], width=width,
                               height=height, title=head)


def weights_view(linear, *, shape=None, n=9, per_row=3, shrink=None):
    """The first ``n`` rows of a Linear layer's weight, each reshaped to an image: what
    each unit of the first layer looks for (scaled from its minimum to its maximum).
    ``shape`` (H, W): by default the square its inputs make (784: 28 x 28, 64: 8 x 8)."""
    w = linear.weight.detach().cpu()
    inputs = w.shape[-1]
    if shape is None:
        side = math.isqrt(inputs)
        if side * side != inputs:
            raise ValueError(f"weights_view: {inputs} inputs make no square image; pass "
                             f"shape=(H, W) with H * W = {inputs}")
        shape = (side, side)
    if math.prod(shape) != inputs:
        raise ValueError(f"weights_view: shape={tuple(shape)} holds {math.prod(shape)} "
                         f"pixels, the layer has {inputs} inputs; pass shape=(H, W) with "
                         f"H * W = {inputs}")
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


def imagine(model, target, *, shape=(1, 1, 28, 28), steps=200, lr=0.1, seed=0, device=None):
    """An input the model takes for class ``target``: start from noise and follow the
    gradient of that class's log-probability, keeping pixels in [0, 1]. Returns the
    image and the probability the model gives it."""
    device = device or loops.model_device(model)
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


def summary(model, example_input):
    """The model layer by layer, as Keras' ``model.summary()``: one row per module that
    ran (dotted name, type, output shape, its own parameters) in the order they ran,
    then the totals: parameters (shared ones counted once), trainable and not, and
    the size of parameters and buffers in memory.

    ``example_input`` is one batch (a tensor, or a tuple of model arguments); the
    forward pass runs once in eval mode without grad, and afterwards the model's mode
    and its buffers are as they were, even those its ``forward`` updates in eval mode
    or replaces (each module's buffers: the same tensors, their values copied back);
    the hooks are removed. Parameters are not copied (a forward that changes its own
    weights in place would change them).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"summary: model must be a torch.nn.Module, got {type(model).__name__}")
    rows, handles = {}, []
    for name, module in model.named_modules():
        if module is model:
            continue
        handles.append(module.register_forward_pre_hook(_noting(rows, name)))
        handles.append(module.register_forward_hook(_noting(rows, name, output=True)))
    modes = [m.training for m in model.modules()]
    buffers = [(m, dict(m._buffers)) for m in model.modules()]
    values = {id(b): b.clone() for _, bs in buffers for b in bs.values() if b is not None}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, training in zip(model.modules(), modes):
            m.training = training
        with torch.no_grad():
            for m, bs in buffers:
                m._buffers.clear()
                m._buffers.update(bs)
                for b in bs.values():
                    if b is not None:
                        b.copy_(values[id(b)])
    table = [("layer", "type", "output shape", "params")]
    for name, (module, shape) in rows.items():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        table.append((name, type(module).__name__, shape or "-", f"{own:,}"))
    table.append(("(output)", type(out).__name__, _shape_of(out), ""))
    return _table(table) + "\n" + _totals(model)


def _noting(rows, name, output=False):
    """A hook that notes, in ``rows``, when the module ``name`` first ran (before) or the
    shape of its output (after); it returns None, so that nothing it sees changes."""
    def before(module, args):
        rows.setdefault(name, [module, None])

    def after(module, args, out):
        rows[name][1] = _shape_of(out)
    return after if output else before


def _shape_of(out):
    """An output's shape as text: (32, 10); a tuple or list of them; a dict of them."""
    if torch.is_tensor(out):
        return str(tuple(out.shape))
    if isinstance(out, (tuple, list)):
        return "[" + ", ".join(_shape_of(o) for o in out) + "]"
    if isinstance(out, dict):
        return "{" + ", ".join(f"{k}: {_shape_of(v)}" for k, v in out.items()) + "}"
    return type(out).__name__


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in
                 enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _totals(model):
    params = {id(p): p for p in model.parameters()}.values()  # a shared tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size = sum(t.numel() * t.element_size()
               for t in [*params, *{id(b): b for b in model.buffers()}.values()])
    return (f"parameters: {total:,} ({trainable:,} trainable, {total - trainable:,} "
            f"non-trainable); size {size / 2 ** 20:.2f} MiB (parameters and buffers)")


_BLOCK = 1 << 22  # elements of an N x N product computed at once (16 MiB in float32)


def tsne_2d(points, *, perplexity=30.0, steps=500, seed=0, learning_rate=None):
    """A t-SNE map of ``points`` (N, D) to (N, 2), in torch (no scikit-learn); returns
    ``(coords, kl)`` where ``kl`` is the Kullback-Leibler divergence of the map, read
    every 50 steps.

    As van der Maaten's, with the affinities of scikit-learn's default method: each
    point's Gaussian over its 3 x perplexity nearest neighbours, its bandwidth found by
    binary search so that its perplexity is ``perplexity``, symmetrised; early
    exaggeration (12) for the first quarter of the steps with momentum 0.5, then 0.8;
    adaptive gains; the learning rate max(N / 48, 50) as scikit-learn's "auto". The
    repulsion is exact (no Barnes-Hut tree), over all pairs in float32, a block at a time,
    so that memory grows as N (20,000 points: a few hundred MB) while the time grows as
    N squared (1,797 points: 3.6 s of one core). Points that are not finite are refused,
    naming the first such row. Seeded: the same points and seed give the same map."""
    X = _tsne_points(points, "tsne_2d")
    n = len(X)
    if n < 3:
        raise ValueError(f"tsne_2d: needs at least 3 points, got {n}")
    if not 1 <= perplexity < n:
        raise ValueError(f"tsne_2d: perplexity must lie in [1, {n}), got {perplexity}")
    starts, rows, cols, p = _affinities(X, perplexity)
    g = torch.Generator().manual_seed(seed)
    Y = 1e-4 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    lr = learning_rate or max(n / 48.0, 50.0)
    update, gains, kl = torch.zeros_like(Y), torch.ones_like(Y), []
    early = steps // 4
    for step in range(steps):
        exaggeration, momentum = (12.0, 0.5) if step < early else (1.0, 0.8)
        z, repulsion = _repulsion(Y)
        far = 1.0 + _pair_distances(Y, rows, cols)  # 1 / q_ij's numerator, for the pairs
        pull = _sparse_rows(starts, cols, exaggeration * p / far, n)
        o = pull @ torch.cat([Y, torch.ones(n, 1, dtype=Y.dtype)], 1)
        grad = 4.0 * (o[:, 2:] * Y - o[:, :2] - repulsion / z)
        same = (grad > 0) == (update > 0)
        gains = torch.where(same, gains * 0.8, gains + 0.2).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        Y = Y + update
        if step % 50 == 49 or step == steps - 1:
            kl.append(float((p * (p * z * far).log()).sum()))  # q = 1 / (far z); p is 0
    return (Y - Y.mean(0)).float(), kl                         # off the pairs


def _sparse_rows(starts, cols, values, n):
    """The (n, n) CSR matrix of the pairs' values (torch's note that CSR is beta, hushed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(starts, cols, values, (n, n), check_invariants=False)


def _pair_distances(Y, rows, cols):
    """|y_i - y_j|^2 for each pair (index_select: several times faster than Y[rows])."""
    d2 = 0
    for c in Y.T:
        d = c.index_select(0, rows) - c.index_select(0, cols)
        d2 = d2 + d.square_()
    return d2


def _tsne_points(points, who):
    """(N, D) float64 points scaled into [-1, 1] (t-SNE's affinities do not depend on the
    scale); a ValueError naming the first row that is not finite."""
    X = _as_points(points)
    X = X.reshape(len(X), -1).cpu().double()
    bad = (~torch.isfinite(X)).any(1).nonzero()
    if len(bad):
        raise ValueError(f"{who}: row {int(bad[0])} of the points is not finite "
                         f"({len(bad)} such rows); drop or fix them first")
    top = X.abs().max() if X.numel() else 0
    return X / top if top > 0 else X


def _repulsion(Y):
    """(Z, F): Z the sum over all pairs i != j of q_ij's numerator 1 / (1 + |y_i - y_j|^2),
    F row i's sum of num_ij^2 (y_i - y_j); in float32, a block of columns at a time (the
    matrix is symmetric: a column block's products give those columns' rows)."""
    Y = Y - Y.mean(0)  # centred: |y|^2 small, so the expansion below is exact enough
    Y32 = Y.float()
    sq, ones = Y32.square().sum(1, keepdim=True), torch.ones(len(Y), 1)
    left = torch.cat([Y32, sq, ones], 1)
    right = torch.cat([-2 * Y32, ones, sq + 1], 1).T.contiguous()
    with_ones = torch.cat([Y32, ones], 1).T.contiguous()
    z, out, size = 0.0, torch.empty(3, len(Y)), max(1, _BLOCK // len(Y))
    for s in range(0, len(Y), size):
        num = (left @ right[:, s:s + size]).reciprocal_()  # 1 / (1 + |y_i - y_j|^2)
        num.diagonal(-s).zero_()
        z += float(num.sum())
        out[:, s:s + size] = with_ones @ num.square_()  # [sum_i num^2 y_i, sum_i num^2]
    out = out.T.double()
    return z, out[:, 2:] * Y - out[:, :2]


def _affinities(X, perplexity, tol=1e-5, tries=64):
    """The symmetric joint probabilities as (starts, rows, cols, p), summing to 1, in the
    order of the rows (``starts``: where each row's pairs begin, as in CSR): each point's
    conditional Gaussian over its k = 3 x perplexity nearest neighbours (scikit-learn's),
    its precision beta found by bisection so that the row's entropy is log(perplexity)."""
    n = len(X)
    k = min(n - 1, int(3 * perplexity + 1))
    sq, size = X.square().sum(1), max(1, _BLOCK // n)
    D, near = torch.empty(n, k, dtype=X.dtype), torch.empty(n, k, dtype=torch.long)
    for s in range(0, n, size):  # the nearest neighbours, a block of rows at a time
        d = (sq[s:s + size, None] - 2 * X[s:s + size] @ X.T + sq).clamp_min_(0)
        d.diagonal(s).fill_(math.inf)
        # into D and near: small results allocated between the blocks kept the freed
        # blocks from being reused (6 GB at 20,000 points instead of a few hundred MB)
        torch.topk(d, k, largest=False, out=(D[s:s + size], near[s:s + size]))
    target = math.log(perplexity)
    beta = torch.ones(n, 1, dtype=X.dtype)
    lo = torch.full_like(beta, 0.0)
    hi = torch.full_like(beta, math.inf)
    for _ in range(tries):  # every row's search at once
        Pc = torch.softmax(-D * beta, 1)
        H = -(Pc * torch.where(Pc > 0, Pc.log(), torch.zeros_like(Pc))).sum(1, keepdim=True)
        if (H - target).abs().max() < tol:
            break
        too_flat = H > target  # entropy too high: a narrower Gaussian, a larger beta
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    i, j = torch.arange(n).repeat_interleave(k), near.reshape(-1)
    pairs, at = torch.unique(torch.cat([i * n + j, j * n + i]), return_inverse=True)
    p = torch.zeros(len(pairs), dtype=X.dtype).index_add_(0, at, torch.cat([Pc.reshape(-1)] * 2))
    rows = pairs // n  # in order: torch.unique sorts
    starts = torch.cat([torch.zeros(1, dtype=rows.dtype), torch.bincount(rows, minlength=n)
                        .cumsum(0)])
    return starts, rows, pairs % n, (p / (2 * n)).clamp_min(1e-12)  # (p_j|i + p_i|j) / 2n


def tsne_view(points, labels, *, title, max_points=1000, perplexity=30.0, steps=500, seed=0,
              width=None, height=24):
    """A 2-D t-SNE scatter of the points (a fixed sample of at most ``max_points``), each
    drawn as its label (the class digit), beside pca_view."""
    points, labels = _labelled(points, labels, "tsne_view")
    if len(points) > max_points:  # a readable sample, the same every time
        keep = torch.linspace(0, len(points) - 1, max_points).round().long()
        points, labels = points[keep], labels[keep]
    perplexity = max(1.0, min(perplexity, (len(points) - 1) / 3))  # a few points: less
    coords, kl = tsne_2d(points, perplexity=perplexity, steps=steps, seed=seed)
    head = f"{title}: t-SNE, perplexity {perplexity:g}, KL {kl[-1]:.2f}"
    return plots_ascii.scatter(coords[:, 0].tolist(), coords[:, 1].tolist(),
                               labels=[str(int(v)) for v in labels], width=width,
                               height=height, title=head)
