"""plots_ascii: training curves and pictures as plain text, for a terminal or a log file.

One file, standard library only: copy it beside your script. Every function
takes lists, tuples, numpy arrays or tensors (anything iterable of numbers, or
with a ``tolist()``) without importing numpy or torch, and returns a string;
printing is yours. Output is plain ASCII unless ``unicode=True`` is asked for,
never carries colour codes, and never raises on data: NaN leaves a gap, +-inf
is clipped to the edge and counted, and empty or constant input gets a frame
with a short note.

    >>> import plots_ascii
    >>> print(plots_ascii.sparkline([3, 1, 4, 1, 5, 9, 2, 6]))
    :_-_+@.*
    >>> chart = plots_ascii.line_plot({"acc": [0.5, 0.8, 0.7]}, width=40, height=6,
    ...                               better="max")
    >>> chart.splitlines()[-1]
    '* acc  last 0.700  best 0.800 @ 2'

From a shell, compare runs by their history.csv files, one series per run:

    python plots_ascii.py runs/a/history.csv runs/b/history.csv --keys loss,val_loss
"""
import argparse
import json
import math
import os
import shutil
import sys
from typing import NamedTuple

__all__ = ["line_plot", "plot_history", "histogram", "bar_chart", "matrix", "image", "scatter",
           "sparkline", "side_by_side"]

GLYPHS = "*o+x#"
UNICODE_GLYPHS = "●○◆◇■"
BEST = "@"
OVERLAP = "&"  # where two series share a cell
RAMP = " .:-=+*#%@"
SPARK = "_.:-=+*#%@"  # like RAMP, but the lowest value stays visible (a space is a NaN)


def _width(width):
    """``width`` as given, else the terminal's (COLUMNS when set), else 80 (a log)."""
    return shutil.get_terminal_size((80, 24)).columns if width is None else width


# --- input ------------------------------------------------------------------------

def _floats(values, what="values"):
    """A flat list of floats from any iterable of numbers (None -> nan)."""
    if values is None:
        return []
    tolist = getattr(values, "tolist", None)  # numpy arrays and tensors, without importing them
    if tolist is not None:
        values = tolist()
    if isinstance(values, (int, float)):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_floats(v, what))
            continue
        if v is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise TypeError(f"{what}: expected numbers, got {type(v).__name__} {v!r}") from None
    return out


def _rows(pixels):
    """2-D nested lists of floats from a 2-D (or 1 x H x W) array-like."""
    tolist = getattr(pixels, "tolist", None)
    rows = tolist() if tolist is not None else [list(r) for r in pixels]
    while len(rows) == 1 and rows and isinstance(rows[0], list) and rows[0] and \
            isinstance(rows[0][0], list):
        rows = rows[0]  # (1, H, W) -> (H, W)
    return [_floats(r, "pixels") for r in rows]


# --- numbers on axes ----------------------------------------------------------------

def _frac(v, lo, hi):
    """Where ``v`` lies from ``lo`` (0) to ``hi`` (1); right also when ``hi - lo``
    overflows (1e308 and -1e308 span more than a float holds)."""
    span = hi - lo
    if math.isinf(span):
        return (v / 2 - lo / 2) / (hi / 2 - lo / 2)
    return (v - lo) / span if span > 0 else 0.0


def _lerp(a, b, t):
    """The value a fraction ``t`` of the way from ``a`` to ``b``, without overflow."""
    v = a + (b - a) * t
    return v if math.isfinite(v) else a * (1 - t) + b * t


def _nice_step(span, target, lo=None, hi=None):
    """The 1/2/5 x 10^n step nearest to cutting ``span`` (or ``hi - lo``) into
    ``target`` parts."""
    target = max(target, 1)
    raw = span / target if lo is None else hi / target - lo / target  # no overflow
    if not raw >= 1e-300:  # nothing to cut, or a span of subnormals (10^n underflows)
        whole = span if lo is None else hi - lo
        return max(whole / target, 5e-324) if whole > 0 else 1.0  # steps of the least float
    if not math.isfinite(raw):
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    return min((m * mag for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))


def _decimals(step):
    return max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0


def _label(v, decimals):
    text = f"{v:.{decimals}f}"
    return "0" if text.strip("-0.") == "" else text


def _short(v):
    """A value for a legend: 0.318, 12.5, 4.2e-05."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.1f}" if a >= 100 else f"{v:.3f}"


def _y_ticks(lo, hi, rows, logy):
    """[(value on the axis scale, label)] at round values inside [lo, hi]."""
    if logy:
        ticks = []
        for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
            for m in (1, 2, 5):
                t = math.log10(m) + e
                if lo - 1e-9 <= t <= hi + 1e-9:
                    ticks.append((t, f"{m * 10.0 ** e:g}"))
        if len(ticks) > rows // 2 + 1:  # too crowded: powers of ten only
            ticks = [(t, s) for t, s in ticks if s.lstrip("0.").startswith("1")] or ticks[:1]
        return ticks
    step = _nice_step(None, max(3, rows // 3), lo, hi)
    while True:  # at least two ticks, so that the scale can be read
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        smaller = _nice_step(step, 2.5)  # 5 -> 2 -> 1 -> 0.5 ...
        if last > first or step < hi * 1e-6 - lo * 1e-6 or not smaller < step:
            break
        step = smaller
    values = [k * step for k in range(first, last + 1)]
    return list(zip(values, _tick_labels(values, _decimals(step), step)))


def _tick_labels(values, decimals, step):
    """Labels with ``decimals`` fixed decimals or, where that would spell out a huge or
    tiny number in full (1e+308, 5e-324), as many significant digits as the step needs."""
    labels = [_label(v, decimals) for v in values]
    if max((len(s) for s in labels), default=0) <= 12:
        return labels
    top = max(abs(v) for v in values) or step
    digits = min(17, max(2, math.floor(math.log10(top)) - math.floor(math.log10(step)) + 1))
    return [f"{v:.{digits}g}" for v in values]


# --- line plots ------------------------------------------------------------------------

def _column_spans(values, columns, n=None, *, stepped=False):
    """Per plot column, the (min, max) of the curve over that column's stretch of x, or None.

    The axis holds x = 0 .. n-1 (n defaults to the series' length; a shorter series
    stops where its points stop). With more points than columns every point in a
    column counts (spikes survive); with fewer, the line between two points is
    interpolated, so the curve stays joined -- or, ``stepped``, each value holds
    until the next point (a step schedule). NaN breaks the line.
    """
    m = len(values)
    n = max(n or m, m)
    if m == 0:
        return [None] * columns
    if n == 1 or columns == 1:
        v = values[-1] if m == 1 else None
        spans = [None] * columns
        if v is not None and not math.isnan(v):
            spans[columns // 2 if n == 1 else 0] = (v, v)
        return spans

    def at(x):  # the value at fractional x, None across a gap
        i = min(int(math.floor(x)), m - 1)
        if stepped or i == m - 1:
            return None if math.isnan(values[i]) else values[i]
        a, b = values[i], values[i + 1]
        t = x - i
        if math.isnan(a) or math.isnan(b):
            return a if t == 0 and not math.isnan(a) else (b if t == 1 and not math.isnan(b)
                                                            else None)
        return a + (b - a) * t

    scale = (n - 1) / (columns - 1)
    spans = []
    for c in range(columns):
        left, right = max(0.0, (c - 0.5) * scale), min(m - 1.0, (c + 0.5) * scale)
        if left > m - 1:  # past the series' last point
            spans.append(None)
            continue
        inside = [values[i] for i in range(math.ceil(left), math.floor(right) + 1)
                  if not math.isnan(values[i])]
        if not inside and all(math.isnan(values[i]) for i in (math.floor(left),
                                                              math.ceil(right))):
            spans.append(None)
            continue
        ends = [v for v in (at(left), at(right)) if v is not None]
        pts = inside + ends
        spans.append((min(pts), max(pts)) if pts else None)
    return spans


def _stepped(name):
    """Series drawn as steps and given no "best": learning rates ("lr", "head_lr")."""
    return name == "lr" or name.endswith("_lr")


def _direction(name, better):
    """"max", "min" or None (not known) for series ``name``: from ``better`` (one
    direction for every series, or {name: direction or None}), else "min" for a series named
    loss or val_loss (as loops.fit's mode="auto"); a learning rate has none."""
    if _stepped(name):
        return None
    if isinstance(better, str):
        return better
    if better and name in better:  # None there: known to be unknown
        return better[name]
    return "min" if name in ("loss", "val_loss") else None


def _best(name, values, better=None):
    """(index, value) of the best finite value (the first of equals), None where the
    direction is not known: never a guess from the name."""
    direction = _direction(name, better)
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if direction is None or not finite:
        return None
    v, i = (max(finite, key=lambda p: (p[0], -p[1])) if direction == "max"
            else min(finite, key=lambda p: (p[0], p[1])))
    return i, v


def line_plot(series, *, width=None, height=18, title=None, xlabel="epoch", ylabel=None,
              logy=False, ymin=None, ymax=None, marks=None, mark_label=None, unicode=False,
              x=None, logx=False, better=None):
    """Plot ``{"name": values}`` against x = 1, 2, ... (epochs); one glyph per series.

    ``x``: the x values instead (increasing, one per point of the longest series),
    e.g. learning rates; ``logx=True`` puts them on a logarithmic axis (powers of
    ten labelled). The points are then placed by their x value.

    Every series shares the x axis: a series shorter than the longest (a run that
    stopped early) ends where its epochs end. ``marks`` are x values to highlight:
    a ':' column (``mark_label`` says what it is), where a series whose best value
    lies on it is drawn as '@'; '&' is a cell two series share. The legend below the
    frame gives each series' last value, and its best where the direction is known:
    ``better`` is "max" or "min" for every series or ``{"name": "max", ...}``; a series
    named loss or val_loss is "min"; any other gets no best (never a guess from its
    name; plot_history passes what loops.fit knew). Learning rates ("lr", "*_lr") are
    drawn as steps, with no best. ``width``: the whole chart's, default the terminal's
    (80 in a log or a pipe).
    """
    width = _width(width)
    if not isinstance(series, dict):
        series = {"": series}
    raw = {k: _floats(v, f"series {k!r}") for k, v in series.items()}
    n = max((len(v) for v in raw.values()), default=0)
    scale = None if x is None else _x_scale(x, n, logx)
    data = raw if scale is None else {k: _on_grid(v, scale) for k, v in raw.items()}
    yr = _y_range(data, logy=logy, ymin=ymin, ymax=ymax)
    ticks = _y_ticks(yr.lo, yr.hi, height, logy)
    label_w = max((len(s) for _, s in ticks), default=1)
    cols = max(2, width - label_w - 3)
    glyphs = dict(zip(data, _cycle(UNICODE_GLYPHS if unicode else GLYPHS, len(data))))
    mark_cols = (_mark_columns(marks, n, cols) if scale is None
                 else {scale.column(v, cols) for v in marks or () if scale.holds(v)})
    grid = _grid(data, yr, glyphs, mark_cols, n, cols, height, better)
    lines = ([title.center(width).rstrip()] if title else []) + ([ylabel] if ylabel else [])
    lines += _frame(grid, ticks, yr, label_w, unicode)
    x_ticks = ([(str(v), c) for v, c in _x_ticks(n, cols)] if scale is None
               else scale.ticks(cols))
    lines += _x_axis(x_ticks, cols, label_w, xlabel, unicode)
    at = None if scale is None else (lambda i: _mark_text(scale.xs[i]))
    lines += _legend(raw, glyphs, yr.clipped, n, at, better)
    if any(OVERLAP in row for row in grid):
        lines.append(f"{OVERLAP} two series in one place")
    if mark_cols:
        lines.append(f": {mark_label or 'marked'} "
                     f"{', '.join(_mark_text(v) for v in sorted(marks))}"
                     f" ({BEST} a series' own best there)")
    if yr.notes:
        lines.append("(" + "; ".join(yr.notes) + ")")
    return "\n".join(lines)


class _YRange(NamedTuple):
    lo: float        # the axis' ends, on its scale (log10 with logy)
    hi: float
    ys: dict         # each series on the axis' scale
    clipped: dict    # per series: values drawn on the edge (+-inf, beyond ymin/ymax)
    notes: list      # "no data", "constant 2.000", ...


def _y_range(data, *, logy, ymin, ymax):
    """The y range: finite values only, after the user's limits; +-inf and values
    beyond the limits are drawn on the edge and counted in the legend."""
    ys = {k: [_scaled(v, logy) for v in vs] for k, vs in data.items()}
    finite = [v for vs in ys.values() for v in vs if math.isfinite(v)]
    lo_lim = _scaled(ymin, logy) if ymin is not None and (not logy or ymin > 0) else None
    hi_lim = _scaled(ymax, logy) if ymax is not None and (not logy or ymax > 0) else None
    lo = lo_lim if lo_lim is not None else (min(finite) if finite else 0.0)
    hi = hi_lim if hi_lim is not None else (max(finite) if finite else 1.0)
    n = max((len(v) for v in data.values()), default=0)
    notes = []
    if not finite:
        notes.append("no data" if n == 0 else "no finite values")
    elif max(finite) == min(finite):
        notes.append(f"constant {_short(finite[0])}" if n > 1 else "one point")
    if hi <= lo:
        pad = abs(hi) * 0.1 if hi else 1.0
        lo, hi = (lo - pad, hi + pad) if lo_lim is None or hi_lim is None else (lo, lo + 1.0)
    clipped = {k: sum(1 for v in vs if math.isinf(v) or (math.isfinite(v) and (
        (lo_lim is not None and v < lo_lim) or (hi_lim is not None and v > hi_lim))))
        for k, vs in ys.items()}
    return _YRange(lo, hi, ys, clipped, notes)


def _scaled(v, logy):
    if logy:
        return math.log10(v) if v > 0 else (-math.inf if v == 0 else math.nan)
    return v


def _row(v, yr, height):
    """The grid row of value ``v`` (on the axis' scale), clipped to the frame."""
    return height - 1 - round(_frac(min(max(v, yr.lo), yr.hi), yr.lo, yr.hi) * (height - 1))


def _mark_text(v):
    return str(int(v)) if float(v).is_integer() else _short(v)


class _XScale(NamedTuple):
    """An x axis of given values (``x=``), linear or logarithmic."""
    xs: list         # the x values, increasing
    pos: list        # their places on the axis (log10 with logx)
    logx: bool

    def place(self, v):
        return math.log10(v) if self.logx else v

    def holds(self, v):
        return (v > 0 or not self.logx) and self.pos[0] <= self.place(v) <= self.pos[-1]

    def column(self, v, cols):
        lo, hi = self.pos[0], self.pos[-1]
        return round(_frac(self.place(v), lo, hi) * (cols - 1)) if hi > lo else cols // 2

    def ticks(self, cols):
        """[(label, column)]: powers of ten on a log axis (and 2, 5 between when it
        spans less than two), round values on a linear one."""
        lo, hi = self.pos[0], self.pos[-1]
        if not self.logx:
            return [(s, self.column(t, cols)) for t, s in _y_ticks(lo, hi, max(2, cols // 10),
                                                                    False)]
        marks = [(t, s) for t, s in _y_ticks(lo, hi, 2 * cols, True)]  # 1, 2, 5 per decade
        if math.floor(hi) - math.ceil(lo) >= 1:
            marks = [(t, s) for t, s in marks if float(t).is_integer()]
        return [(s, self.column(10 ** t, cols)) for t, s in marks]


def _x_scale(x, n, logx):
    """The _XScale of ``x``: ValueError unless it gives one increasing value per point
    of the longest series (positive ones for logx)."""
    xs = _floats(x, "x")
    if len(xs) != n:
        raise ValueError(f"line_plot: {len(xs)} x values for {n} points; expected one each")
    if any(not math.isfinite(v) for v in xs) or any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError("line_plot: x must be finite and increasing")
    if logx and xs and xs[0] <= 0:
        raise ValueError(f"line_plot: logx needs positive x values, got {xs[0]}")
    return _XScale(xs, [math.log10(v) for v in xs] if logx else xs, logx)


def _on_grid(values, scale):
    """A series resampled at evenly spaced places of the x axis (linear interpolation
    between its points), up to its last point: what the epoch axis draws."""
    pos, n = scale.pos, len(scale.pos)
    if n < 2 or len(values) < 2:
        return values
    lo, hi, out, j = pos[0], pos[-1], [], 0
    last = pos[len(values) - 1]
    for k in range(n):
        t = _lerp(lo, hi, k / (n - 1))
        if t > last + 1e-12 * max(1.0, abs(last)):
            break
        while j < len(values) - 2 and pos[j + 1] < t:
            j += 1
        w = min(1.0, max(0.0, _frac(t, pos[j], pos[j + 1])))
        a, b = values[j], values[j + 1]
        out.append(a if w == 0 else b if w == 1 else _lerp(a, b, w))
    return out


def _mark_columns(marks, n, cols):
    out = set()
    for x in marks or ():
        if n > 1 and 1 <= x <= n:
            out.add(round((x - 1) / (n - 1) * (cols - 1)))
        elif n == 1 and x == 1:
            out.add(cols // 2)
    return out


def _grid(data, yr, glyphs, mark_cols, n, cols, height, better=None):
    """The plotting area as rows of characters: the marked columns, then each series on
    the shared x axis; a cell two series cross shows OVERLAP, so neither hides the other."""
    grid = [[" "] * cols for _ in range(height)]
    for c in mark_cols:
        for r in range(height):
            grid[r][c] = ":"
    drawn = set(glyphs.values()) | {BEST, OVERLAP}
    for k, glyph in glyphs.items():
        edge = [yr.hi if v == math.inf else yr.lo if v == -math.inf else v for v in yr.ys[k]]
        best = _best(k, data[k], better)
        best_col = None if best is None else (
            cols // 2 if n == 1 else round(best[0] / (n - 1) * (cols - 1)))
        for c, span in enumerate(_column_spans(edge, cols, n, stepped=_stepped(k))):
            if span is None:
                continue
            for r in range(_row(span[1], yr, height), _row(span[0], yr, height) + 1):
                if c == best_col and c in mark_cols:
                    grid[r][c] = BEST
                elif grid[r][c] in drawn and grid[r][c] != glyph:
                    grid[r][c] = OVERLAP if grid[r][c] != BEST else BEST
                else:
                    grid[r][c] = glyph
    return grid


def _frame(grid, ticks, yr, label_w, unicode):
    """The grid inside a frame, with the y ticks' labels on the left."""
    height, cols = len(grid), len(grid[0])
    h, v, corner = ("─", "│", "+") if unicode else ("-", "|", "+")
    tick_rows = {}
    for t, s in ticks:
        tick_rows.setdefault(_row(t, yr, height), s)
    lines = [" " * label_w + " " + corner + h * cols + corner]
    for r in range(height):
        label = tick_rows.get(r, "")
        lines.append(f"{label:>{label_w}} " + ("+" if label else v) + "".join(grid[r]) + v)
    return lines


def _x_axis(ticks, cols, label_w, xlabel, unicode):
    """The frame's bottom edge with ``ticks`` [(label, column)] whose labels do not
    collide (a label that would is left out), and the axis' name."""
    h, corner = ("─", "+") if unicode else ("-", "+")
    axis, labels, last_end = [h] * cols, [" "] * (cols + 1), -1
    for text, c in ticks:
        start = min(c, cols + 1 - len(text))  # the last label ends under the frame's edge
        if start <= last_end:
            continue
        axis[c] = "+"
        labels[start:start + len(text)] = text
        last_end = start + len(text)
    lines = [" " * label_w + " " + corner + "".join(axis) + corner,
             (" " * (label_w + 2) + "".join(labels)).rstrip()]
    if xlabel:
        lines.append((" " * (label_w + 2) + xlabel.center(cols)).rstrip())
    return lines


def _legend(data, glyphs, clipped, n, at=None, better=None):
    """A line per series below the frame: its glyph, name, last and best value (and
    how many of the axis' n points it has, when it stopped early). ``at(i)``: the
    x of point i as text (default: the epoch, i + 1)."""
    at = at or (lambda i: str(i + 1))
    name_w = max((len(k) for k in data), default=0)
    lines = []
    for k, glyph in glyphs.items():
        vals = data[k]
        parts = [f"{glyph} {k:<{name_w}}" if name_w else glyph]
        if any(math.isfinite(v) for v in vals):
            best = _best(k, vals, better)
            parts.append(f"last {_short(vals[-1])}")
            if best is not None:
                parts.append(f"best {_short(best[1])} @ {at(best[0])}")
            if len(vals) < n:
                parts.append(f"{len(vals)} of {n}")
        else:
            parts.append("no finite values" if vals else "no data")
        if clipped[k]:
            parts.append(f"{clipped[k]} clipped to the edge")
        lines.append("  ".join(parts))
    return lines


def _cycle(chars, n):
    return [chars[i % len(chars)] for i in range(n)]


def _x_ticks(n, cols):
    """[(x, column)] for whole x in 1..n, spaced so that labels do not collide."""
    if n <= 0:
        return []
    if n == 1:
        return [(1, cols // 2)]
    room = len(str(n)) + 2
    step = max(1, math.ceil(_nice_step(n - 1, max(1, cols // (room * 2)))))
    xs = [1] + [x for x in range(step, n + 1, step) if x > 1]
    ticks = [(x, round((x - 1) / (n - 1) * (cols - 1))) for x in xs]
    if xs[-1] != n:  # the last epoch is always labelled, in place of a neighbour too close
        while len(ticks) > 1 and cols - 1 - ticks[-1][1] < room:
            ticks.pop()
        ticks.append((n, cols - 1))
    return ticks


def plot_history(history, keys=None, *, monitor=None, better=None, **kw):
    """One chart per metric, ``x`` beside ``val_x``; every chart marks the same epoch,
    the one ``loops.fit`` kept in best.pt, read from the history's ``best_epoch``
    column (fit decides it, with its monitor, mode and min_delta; nothing is decided
    here again). ``monitor`` only names it in the legend: fit's ``monitor``, if you
    know it. A history without that column gets no mark.

    ``history`` is what ``loops.fit`` returns (or reads from history.csv); ``keys``
    picks the base names to draw. A series' best is given where its direction is
    known: ``better`` ({"val_acc": "max", ...}), by default fit's ``history.better``
    (the loss, the built-in metrics, the monitor by fit's mode); see line_plot.
    """
    better = better if better is not None else getattr(history, "better", None)
    skip = ("epoch", "lr", "time", "best_epoch")
    bases = [k for k in history if not k.startswith(("val_", "lr_")) and k not in skip]
    bases += [k[4:] for k in history if k.startswith("val_") and k[4:] not in bases]
    if keys is not None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in keys if k not in bases]
        if unknown:
            raise ValueError(f"plot_history: no {unknown} in the history; it has {bases}")
        bases = keys
    if monitor is not None and monitor not in history:
        raise ValueError(f"plot_history: monitor {monitor!r} is not in the history; it has "
                         f"{', '.join(history)}")
    chosen = [v for v in _floats(history.get("best_epoch", [])) if math.isfinite(v)]
    opts = dict(kw)
    if chosen:
        opts.setdefault("marks", [int(chosen[-1])])
        opts.setdefault("mark_label", f"best {monitor}, epoch" if monitor
                        else "best.pt holds epoch")
    charts = []
    for k in bases:
        series = {name: history[name] for name in (k, "val_" + k) if name in history}
        charts.append(line_plot(series, title=k, better=better, **opts))
    return "\n\n".join(charts)


# --- other charts --------------------------------------------------------------------------

def _nonfinite_note(values):
    nan = sum(1 for v in values if math.isnan(v))
    inf = sum(1 for v in values if math.isinf(v))
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
    return f"({' and '.join(parts)} not counted)" if parts else ""


def histogram(values, *, bins=20, width=50, title=None, value_range=None, top=None):
    """One row per bin: its range, a bar and its count; NaN and inf counted apart.

    To compare histograms, give them the same ``value_range=(lo, hi)`` (the bins;
    values outside are counted in a note) and the same ``top`` (the count drawn
    ``width`` characters long).
    """
    vals = _floats(values)
    finite = [v for v in vals if math.isfinite(v)]
    lines = [title] if title else []
    lo, hi = value_range if value_range is not None else (
        (min(finite), max(finite)) if finite else (0.0, 0.0))
    outside = [v for v in finite if not lo <= v <= hi]
    finite = [v for v in finite if lo <= v <= hi]
    if not finite:
        lines.append("(no finite values)" if vals else "(no data)")
        note = _nonfinite_note(vals)
        return "\n".join(lines + ([note] if note else []))
    bins = max(1, int(bins)) if hi > lo else 1
    size = hi / bins - lo / bins if hi > lo else 1.0  # (hi - lo) / bins, without overflow
    counts = [0] * bins
    for v in finite:
        counts[min(int(_frac(v, lo, hi) * bins), bins - 1)] += 1
    d = max(_decimals(size) + 1, 0) if hi > lo else 3
    edges = _tick_labels([_lerp(lo, hi, i / bins) for i in range(bins + 1)], d, size)
    ew = max(len(e) for e in edges)
    top = max(top or 0, max(counts))
    cw = len(str(top))
    for i, c in enumerate(counts):
        close = "]" if i == bins - 1 else ")"
        bar = "#" * round(c / top * width)
        lines.append(f"[{edges[i]:>{ew}}, {edges[i + 1]:>{ew}}{close} {c:>{cw}} {bar}".rstrip())
    if outside:
        lines.append(f"({len(outside)} outside [{_short(lo)}, {_short(hi)}] not counted)")
    note = _nonfinite_note(vals)
    return "\n".join(lines + ([note] if note else []))


def bar_chart(mapping, *, width=50, title=None, labels=None):
    """One row per key: the label, a bar of '#' proportional to the value, the value
    (or ``labels[key]``, a text of your own such as '90.5% (19/21)')."""
    items = [(str(k), v) for k, v in zip(mapping, _floats(list(mapping.values())))]
    labels = {str(k): text for k, text in (labels or {}).items()}
    lines = [title] if title else []
    if not items:
        return "\n".join(lines + ["(no data)"])
    top = max((abs(v) for _, v in items if math.isfinite(v)), default=0) or 1.0
    kw = max(len(k) for k, _ in items)
    for k, v in items:
        bar = ("#" if v >= 0 else "-") * round(abs(v) / top * width) if math.isfinite(v) else "?"
        text = str(labels[k]) if k in labels else _short(v)
        lines.append(f"{k:>{kw}} | {bar} {text}")
    return "\n".join(lines)


def matrix(rows, *, row_labels=None, col_labels=None, title=None, percent=False):
    """A table of numbers, right-aligned; ``percent=True`` shows each cell as % of its row.

    For a confusion matrix: rows are true labels, columns predicted labels.
    """
    data = _rows(rows)
    lines = [title] if title else []
    if not data or not data[0]:
        return "\n".join(lines + ["(no data)"])
    ncol = max(len(r) for r in data)
    row_labels = [str(x) for x in (row_labels if row_labels is not None else range(len(data)))]
    col_labels = [str(x) for x in (col_labels if col_labels is not None else range(ncol))]

    def cell(v, total):
        if percent:
            return f"{100 * v / total:.0f}%" if total else "-"
        return str(int(v)) if math.isfinite(v) and v == int(v) else _short(v)
    cells = [[cell(v, sum(x for x in r if math.isfinite(x))) for v in r] for r in data]
    w = max([len(c) for r in cells for c in r] + [len(c) for c in col_labels])
    lw = max(len(x) for x in row_labels)
    lines.append(" " * lw + " | " + " ".join(f"{c:>{w}}" for c in col_labels))
    lines.append("-" * lw + "-+-" + "-".join("-" * w for _ in col_labels))
    for label, r in zip(row_labels, cells):
        lines.append(f"{label:>{lw}} | " + " ".join(f"{c:>{w}}" for c in r))
    return "\n".join(lines)


def image(pixels, *, invert=False):
    """A grey image, one text row per pixel row, two characters per pixel (` .:-=+*#%@`).

    Values in [0, 1] are drawn as they are; anything else is scaled from its
    minimum to its maximum first (weights, say).
    """
    data = _rows(pixels)
    flat = [v for r in data for v in r if math.isfinite(v)]
    if not flat:
        return "(no data)"
    lo, hi = min(flat), max(flat)
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    ramp = RAMP[::-1] if invert else RAMP
    out = []
    for r in data:
        chars = []
        for v in r:
            if not math.isfinite(v):
                chars.append("??")
                continue
            level = min(len(ramp) - 1, int(_frac(v, lo, hi) * len(ramp)))
            chars.append(ramp[level] * 2)
        out.append("".join(chars).rstrip() if not invert else "".join(chars))
    return "\n".join(out)


def scatter(xs, ys, *, labels=None, width=None, height=24, title=None):
    """Points in a frame; with ``labels``, each label's own marker (a one-character label
    such as a class digit is its own marker) and a legend. ``width`` as line_plot's."""
    width = _width(width)
    x, y = _floats(xs, "xs"), _floats(ys, "ys")
    if len(x) != len(y):
        raise ValueError(f"scatter: {len(x)} xs but {len(y)} ys")
    labs = [str(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)] \
        if labels is not None else ["" for _ in x]
    if len(labs) != len(x):
        raise ValueError(f"scatter: {len(labs)} labels for {len(x)} points")
    kinds = sorted(set(labs), key=lambda s: (len(s), s))
    if all(len(k) == 1 for k in kinds):
        marker = {k: k for k in kinds} if labels is not None else {"": "*"}
    else:
        marker = dict(zip(kinds, _cycle(GLYPHS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ", len(kinds))))
    pts = [(a, b, m) for a, b, m in zip(x, y, labs) if math.isfinite(a) and math.isfinite(b)]
    lines = [title.center(width).rstrip()] if title else []
    if not pts:
        return "\n".join(lines + ["(no finite points)"])
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    ticks = _y_ticks(y_lo, y_hi, height, False)
    lw = max(len(s) for _, s in ticks)
    cols = max(2, width - lw - 3)
    grid = [[" "] * cols for _ in range(height)]

    def row(v):
        return height - 1 - round(_frac(v, y_lo, y_hi) * (height - 1))
    for a, b, m in pts:
        grid[row(b)][round(_frac(a, x_lo, x_hi) * (cols - 1))] = marker[m]
    tick_rows = {}
    for t, s in ticks:
        tick_rows.setdefault(row(t), s)
    lines.append(" " * lw + " +" + "-" * cols + "+")
    for r in range(height):
        label = tick_rows.get(r, "")
        lines.append(f"{label:>{lw}} " + ("+" if label else "|") + "".join(grid[r]) + "|")
    x_ticks = [(s, round(_frac(t, x_lo, x_hi) * (cols - 1)))
               for t, s in _y_ticks(x_lo, x_hi, max(2, cols // 10), False)]
    lines += _x_axis(x_ticks, cols, lw, None, False)
    if labels is not None and any(k != v for k, v in marker.items()):
        lines.append("  ".join(f"{marker[k]} {k}" for k in kinds))
    skipped = len(x) - len(pts)
    if skipped:
        lines.append(f"({skipped} non-finite points not drawn)")
    return "\n".join(lines)


def side_by_side(blocks, *, gap=2):
    """Text blocks (strings of lines) next to each other, top-aligned, each padded to its width."""
    split = [b.splitlines() for b in blocks]
    if not split:
        return ""
    widths = [max((len(ln) for ln in lines), default=0) for lines in split]
    height = max(len(lines) for lines in split)
    rows = []
    for r in range(height):
        cells = [(lines[r] if r < len(lines) else "").ljust(w) for lines, w in zip(split, widths)]
        rows.append((" " * gap).join(cells).rstrip())
    return "\n".join(rows)


def sparkline(values, *, unicode=False):
    """One character per value, low to high (`_.:-=+*#%@`, or block characters); NaN is a space."""
    vals = _floats(values)
    finite = [v for v in vals if math.isfinite(v)]
    ramp = "▁▂▃▄▅▆▇█" if unicode else SPARK
    if not finite:
        return " " * len(vals)
    lo, hi = min(finite), max(finite)
    out = []
    for v in vals:
        if math.isnan(v):
            out.append(" ")
        elif hi == lo:
            out.append(ramp[len(ramp) // 2])
        else:
            t = 1.0 if v == math.inf else 0.0 if v == -math.inf else _frac(v, lo, hi)
            out.append(ramp[min(len(ramp) - 1, int(t * len(ramp)))])
    return "".join(out)


# --- command line ------------------------------------------------------------------------------

def _read_history(path):
    import csv
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (it does not decode as UTF-8); expected "
                         "a history.csv") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a CSV file ({e}); expected a history.csv") from None
    if not rows or not rows[0]:
        raise ValueError(f"{path}: empty file; expected a history.csv with a header line")
    header, body = rows[0], rows[1:]
    history = {k: [] for k in header}
    for line, row in enumerate(body, 2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} values for {len(header)} columns")
        for k, v in zip(header, row):
            try:
                history[k].append(float(v))
            except ValueError:
                raise ValueError(f"{path}, line {line}: {k}={v!r} is not a number") from None
    return history


def _read_directions(path):
    """{key: "min" or "max"} that loops.fit saved beside a history.csv (run.json's
    "better"); {} where there is none or it cannot be read: then no best is claimed
    but the loss's."""
    try:
        with open(os.path.join(os.path.dirname(path), "run.json"), encoding="utf-8") as f:
            better = json.load(f).get("better", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in better.items() if v in ("min", "max")} if isinstance(
        better, dict) else {}


def _run_name(path, taken):
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)[:-1]
    name = parts[-1] if parts else path
    depth = 2
    while name in taken and depth <= len(parts):
        name = "/".join(parts[-depth:])
        depth += 1
    return name


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as every other error here
        raise ValueError(message)


def _at_least(low):
    def whole(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value
    return whole


def _parser():
    p = _Parser(prog="python plots_ascii.py",
                description="Draw the curves of one or more runs, one chart per key and "
                            "one series per run (named after its directory).")
    p.add_argument("paths", nargs="*", metavar="RUN/history.csv")
    p.add_argument("--keys", default=None, help="columns to draw, e.g. loss,val_loss "
                   "(default: all but epoch and time)")
    p.add_argument("--width", type=_at_least(20), default=None,
                   help="characters (>= 20; default: the terminal's, 80 in a pipe)")
    p.add_argument("--height", type=_at_least(3), default=18, help="rows (>= 3)")
    return p


def main(argv=None):
    """python plots_ascii.py RUN/history.csv [...] [--keys a,b] [--width N] [--height N]"""
    try:
        args = _parser().parse_args(argv)
        if not args.paths:
            raise ValueError("no history.csv given; usage: python plots_ascii.py "
                             "RUN/history.csv [RUN2/history.csv ...] [--keys loss,val_loss]")
        runs, better = {}, {}
        for p in args.paths:
            if not os.path.isfile(p):
                raise ValueError(f"{p}: no such file")
            name = _run_name(p, runs)
            runs[name], better[name] = _read_history(p), _read_directions(p)
        known = [k for h in runs.values() for k in h if k not in ("epoch", "time", "best_epoch")]
        keys = args.keys.split(",") if args.keys else list(dict.fromkeys(known))
        missing = [k for k in keys if k not in known]
        if missing:
            raise ValueError(f"no column {missing[0]!r} in any run; the runs have "
                             f"{', '.join(dict.fromkeys(known))}")
    except (ValueError, OSError) as e:
        print(f"plots_ascii: {e}", file=sys.stderr)
        return 2
    charts = []
    for k in keys:
        series = {name: h[k] for name, h in runs.items() if k in h}
        directions = {name: _direction(k, better[name]) for name in series}  # each run's own
        charts.append(line_plot(series, width=args.width, height=args.height, title=k,
                                better=directions))
    try:
        print("\n\n".join(charts), flush=True)
    except BrokenPipeError:  # `| head` has read enough: end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
