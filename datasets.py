"""Datasets of the examples, offline: stand-ins generated here, or the real files you have.

Every function returns ``(X, y)`` tensor pairs ready for ``loops.fit``; X is
float32, y is float32 of shape (N, 1) for regression and binary targets and
int64 of shape (N,) for class labels. Splits are reproducible with ``seed=``.
Tabular inputs are standardised with statistics of the training part only.

    >>> import datasets
    >>> data = datasets.linear()
    >>> (X, y), (Xt, yt) = data
    >>> X.shape, Xt.shape, data.source
    (torch.Size([40, 1]), torch.Size([10, 1]), 'y = 0.7 x + 0.3 (generated)')

The value returned is a tuple of the splits with a ``.source`` attribute that
says where the data came from ("synthetic stand-in for ..." or the file path).
Nothing is ever downloaded.
"""
import csv
import gzip
import math
import os
import struct

import numpy as np
import torch

__all__ = ["linear", "pima", "housing", "digits", "mnist", "load_csv", "Splits"]


class Splits(tuple):
    """A tuple of (X, y) splits that also says where its data came from."""

    def __new__(cls, splits, source):
        self = super().__new__(cls, splits)
        self.source = source
        return self


def _tensors(X, y, *, classes=False):
    X = torch.as_tensor(np.ascontiguousarray(X), dtype=torch.float32)
    y = torch.as_tensor(np.ascontiguousarray(y))
    y = y.long().reshape(-1) if classes else y.float().reshape(-1, 1)
    return X, y


def _standardise(train, *others):
    """Scale every part with the training part's mean and population std (as scikit-learn's
    StandardScaler); a constant column is divided by 1."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(part - mean) / std for part in (train, *others)]


# --- linear -------------------------------------------------------------------

def linear(weight=0.7, bias=0.3):
    """y = weight * x + bias on x = 0, 0.02, ..., 0.98: 40 train points, 10 test (no scaling)."""
    X = torch.arange(0, 1, 0.02).unsqueeze(1)
    y = weight * X + bias
    cut = int(0.8 * len(X))
    return Splits([(X[:cut], y[:cut]), (X[cut:], y[cut:])],
                  f"y = {weight} x + {bias} (generated)")


# --- tables: pima, housing -----------------------------------------------------

def pima(path=None, seed=0):
    """Pima Indians diabetes (768 x 8, outcome last): rows 0-699 train, 700-767 test.

    Without ``path``: a synthetic stand-in of the same shape, columns and about
    35% positives, from a logistic model over plausible feature distributions.
    """
    if path is not None:
        X, y = load_csv(path)
        source = path
        if X.shape[1] != 8:
            raise ValueError(f"{path}: expected 8 feature columns and the outcome last, got "
                             f"{X.shape[1] + 1} columns")
        X, y = X.numpy(), y.numpy()
    else:
        X, y = _synthetic_pima(seed)
        source = "synthetic stand-in for the Pima Indians diabetes table"
    train, test = _standardise(X[:700], X[700:])
    return Splits([_tensors(train, y[:700]), _tensors(test, y[700:])], source)


def _synthetic_pima(seed, n=768):
    r = np.random.default_rng(seed)
    pregnancies = r.poisson(3.8, n).clip(0, 17)
    glucose = r.normal(121, 31, n).clip(44, 199)
    pressure = r.normal(72, 12, n).clip(24, 122)
    skin = r.normal(29, 10, n).clip(7, 99)
    insulin = r.lognormal(4.7, 0.6, n).clip(14, 846)
    bmi = r.normal(32.4, 6.9, n).clip(18, 67)
    pedigree = r.lognormal(-0.9, 0.6, n).clip(0.08, 2.42)
    age = (21 + r.gamma(1.6, 7.5, n)).clip(21, 81).round()
    X = np.stack([pregnancies, glucose, pressure, skin, insulin, bmi, pedigree, age], 1)
    z = (0.035 * (glucose - 121) + 0.09 * (bmi - 32.4) + 0.9 * (pedigree - 0.47)
         + 0.03 * (age - 33) + 0.1 * (pregnancies - 3.8) - 0.75)
    y = (r.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
    return X.astype(np.float32), y


def housing(path=None, seed=0):
    """California housing (20640 x 8, median house value last, in $100k): shuffled 70/30.

    ``path`` is a numeric CSV with eight feature columns and the target last,
    header optional. Without it: a synthetic stand-in of that shape (income,
    age, rooms, bedrooms, population, occupancy, latitude, longitude).
    """
    if path is not None:
        X, y = load_csv(path)
        if X.shape[1] != 8:
            raise ValueError(f"{path}: expected 8 feature columns and the target last, got "
                             f"{X.shape[1] + 1} columns")
        X, y, source = X.numpy(), y.numpy().reshape(-1), path
    else:
        X, y = _synthetic_housing(seed)
        source = "synthetic stand-in for California housing"
    order = np.random.default_rng(seed).permutation(len(X))
    cut = int(round(0.7 * len(X)))
    tr, te = order[:cut], order[cut:]
    train, test = _standardise(X[tr], X[te])
    return Splits([_tensors(train, y[tr]), _tensors(test, y[te])], source)


def _synthetic_housing(seed, n=20640):
    r = np.random.default_rng(seed + 1)
    income = r.lognormal(1.24, 0.47, n).clip(0.5, 15)
    age = r.integers(1, 53, n).astype(np.float64)
    rooms = r.lognormal(1.6, 0.25, n).clip(1, 30)
    bedrooms = (rooms * r.normal(0.2, 0.03, n)).clip(0.3, 6)
    population = r.lognormal(7.0, 0.75, n).clip(3, 35000)
    occupancy = r.lognormal(1.05, 0.25, n).clip(0.7, 20)
    coast = r.random(n) < 0.55  # two clusters: the coast (LA, Bay Area) and the inland valley
    lat = np.where(coast, r.normal(35.5, 2.0, n), r.normal(37.0, 1.5, n)).clip(32.5, 42)
    lon = np.where(coast, -124.3 + 0.9 * (42 - lat) + r.normal(0, 0.4, n),
                   -121.5 + 0.5 * (40 - lat) + r.normal(0, 0.6, n)).clip(-124.4, -114.3)
    X = np.stack([income, age, rooms, bedrooms, population, occupancy, lat, lon], 1)
    value = (0.42 * income + 0.9 * coast + 0.006 * age - 0.12 * np.log(occupancy)
             + 0.4 * np.exp(-((lat - 34.1) ** 2 + (lon + 118.3) ** 2))
             + 0.4 * np.exp(-((lat - 37.7) ** 2 + (lon + 122.3) ** 2)) - 0.1)
    y = (value * r.lognormal(0, 0.22, n)).clip(0.15, 5.0)
    return X.astype(np.float32), y.astype(np.float32)


# --- csv -----------------------------------------------------------------------

def load_csv(path, target=-1, delimiter=",", skip_header=None):
    """Read a numeric CSV into (X float32 (N, k), y float32 (N, 1)); column ``target`` is y.

    A first line with a non-numeric cell is taken as a header unless
    ``skip_header`` says otherwise. A bad cell, a ragged row or an empty file is
    a ValueError naming the file, the line and the column.
    """
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    numbered = [(i, row) for i, row in enumerate(rows, 1) if any(c.strip() for c in row)]
    if skip_header is None:
        skip_header = bool(numbered) and not all(_is_number(c) for c in numbered[0][1])
    if skip_header:
        numbered = numbered[1:]
    if not numbered:
        raise ValueError(f"{path}: no data rows (the file is empty"
                         f"{' but for its header' if skip_header else ''}); expected numeric rows")
    width = len(numbered[0][1])
    if width < 2:
        raise ValueError(f"{path}, line {numbered[0][0]}: one column; expected features and a "
                         "target")
    values = np.empty((len(numbered), width), dtype=np.float64)
    for r, (line, row) in enumerate(numbered):
        if len(row) != width:
            raise ValueError(f"{path}, line {line}: {len(row)} columns, expected {width} like "
                             f"line {numbered[0][0]}")
        for c, cell in enumerate(row):
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise ValueError(f"{path}, line {line}, column {c + 1}: {cell!r} is not a "
                                 "number") from None
    if not -width <= target < width:
        raise ValueError(f"target={target} is not a column of {path} ({width} columns)")
    t = target % width
    X = np.delete(values, t, axis=1)
    return _tensors(X, values[:, t])


def _is_number(cell):
    try:
        float(cell)
        return True
    except ValueError:
        return False


# --- images: digits, mnist -------------------------------------------------------

def _arc(cx, cy, rx, ry, a0, a1, k=10):
    t = np.linspace(math.radians(a0), math.radians(a1), k)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _strokes():
    """Each digit as polylines in a unit box (x right, y down)."""
    line = lambda *pts: np.array(pts, dtype=np.float64)  # noqa: E731
    return {
        0: [_arc(.5, .5, .3, .42, 0, 360, 20)],
        1: [line((.38, .25), (.55, .08), (.55, .92))],
        2: [np.concatenate([_arc(.5, .32, .26, .22, 200, 380, 10),
                            line((.73, .4), (.25, .92), (.8, .92))])],
        3: [_arc(.48, .29, .25, .2, 210, 450, 10), _arc(.48, .7, .28, .22, 270, 510, 10)],
        4: [line((.68, .92), (.68, .08), (.2, .66), (.82, .66))],
        5: [line((.76, .1), (.32, .1), (.28, .46)),
            _arc(.5, .66, .27, .25, 225, 495, 12)],
        6: [np.concatenate([_arc(.62, .42, .32, .36, 280, 170, 8),
                            _arc(.5, .7, .24, .21, 170, 530, 14)])],
        7: [line((.2, .1), (.8, .1), (.42, .92))],
        8: [_arc(.5, .28, .2, .19, 0, 360, 14), _arc(.5, .7, .25, .22, 0, 360, 16)],
        9: [_arc(.5, .32, .23, .22, 0, 360, 14), line((.73, .32), (.64, .92))],
    }


def _render_bank(rng, per_class, size=28, jitter=0.06):
    """Draw ``per_class`` jittered variants of each digit with its own stroke width."""
    grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2) + 0.5)
    bank = np.zeros((10, per_class, size * size), dtype=np.float32)
    for digit, polylines in _strokes().items():
        for v in range(per_class):
            width = rng.uniform(1.0, 2.3)
            best = np.full(size * size, np.inf)
            extra = []
            if rng.random() < 0.3:  # a stray stroke, as pens slip: some images are ambiguous
                start = rng.uniform(0.1, 0.9, 2)
                extra = [np.stack([start, start + rng.normal(0, 0.25, 2)])]
            for pts in list(polylines) + extra:
                pts = pts + rng.normal(0, jitter, pts.shape)  # a hand is never the same twice
                pts = 4 + 20 * pts  # into the 20 x 20 box in the middle, as MNIST
                a, b = pts[:-1], pts[1:]
                ab = b - a
                t = ((grid[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9)
                closest = a + t.clip(0, 1)[..., None] * ab
                best = np.minimum(best, np.sqrt(((grid[:, None] - closest) ** 2).sum(-1)).min(1))
            bank[digit, v] = (width / 2 + 0.5 - best).clip(0, 1)  # anti-aliased edge
    return bank.reshape(10, per_class, size, size)


def digits(n=12000, seed=0, noise=0.15):
    """Procedural hand-written digits: X (N, 1, 28, 28) in [0, 1], y int64 in 0-9.

    Returns (train, val, test) split 80/10/10. Each image is one of a bank of
    jittered strokes per class, slanted, rotated, scaled and shifted at random,
    with pixel noise: a small MLP learns it well but not perfectly.
    """
    if n < 10:
        raise ValueError(f"digits: n must be at least 10, got {n}")
    rng = np.random.default_rng(seed)
    bank = torch.from_numpy(_render_bank(rng, per_class=48))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    variant = torch.randint(0, bank.shape[1], (n,), generator=g)
    images = bank[y, variant].unsqueeze(1)
    # One random affine map per image: slant, rotation, scale, shift (in [-1, 1] units).
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    slant, angle, scale = u(-0.5, 0.5), u(-0.3, 0.3), u(0.75, 1.2)
    dx, dy = u(-0.18, 0.18), u(-0.18, 0.18)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + slant, dx], 1),
                         torch.stack([sin, cos, dy], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, images.shape, align_corners=False)
    X = torch.nn.functional.grid_sample(images, grid, align_corners=False)
    X = (X + noise * torch.randn(X.shape, generator=g)).clamp(0, 1)
    a, b = int(0.8 * n), int(0.9 * n)
    return Splits([(X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:])],
                  f"procedural digits ({n} images, seed {seed}), a stand-in for MNIST")


_IDX_NAMES = {
    "train_images": ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
    "train_labels": ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
    "test_images": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    "test_labels": ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
}


def mnist(root):
    """MNIST or Fashion-MNIST from the IDX files in ``root`` (gzipped or not): (train, test)."""
    parts = {}
    for key, names in _IDX_NAMES.items():
        found = [os.path.join(root, nm + ext) for nm in names for ext in ("", ".gz")
                 if os.path.isfile(os.path.join(root, nm + ext))]
        if not found:
            raise FileNotFoundError(f"{root}: no {names[0]}[.gz]; expected the four MNIST IDX "
                                    "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")
        parts[key] = _read_idx(found[0])
    out = []
    for split in ("train", "test"):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} "
                             "do not match")
        X = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        out.append((X, torch.from_numpy(labels.astype(np.int64))))
    return Splits(out, root)


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape}, but the file holds {body.size} "
                         "values")
    return body.reshape(shape)
