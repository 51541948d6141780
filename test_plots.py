"""Tests of plots_ascii.py: golden strings where output is fixed, properties elsewhere."""
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import unittest

import plots_ascii as pa

HERE = os.path.dirname(os.path.abspath(__file__))
NAN, INF = float("nan"), float("inf")

GOLDEN_LINE = """\
    +----------------------------------+
    |oo                  :             |
1.0 +*&oo                :             |
    | **&o               :             |
0.8 +   *&oo             :             |
    |    **&oooo         :             |
0.6 +      ****&oooooo   :      ooooooo|
    |          ******&&oo@ooooooo      |
0.4 +                 *****************|
    ++------+-----+------+-----+------++
     1      2     3      4     5      6
                   epoch
* loss      last 0.370  best 0.370 @ 6
o val_loss  last 0.560  best 0.500 @ 4
& two series in one place
: marked 4 (@ a series' own best there)"""

GOLDEN_HISTORY_ACC = """\
             acc
    +------------------------+
0.8 +            :    *******|
0.7 +         *********      |
0.6 +   ******&oooooooooooooo|
0.5 +***&oooooo  :           |
0.4 +oooo        :           |
    ++-----------+----------++
     1           2          3
              epoch
* acc      last 0.800  best 0.800 @ 3
o val_acc  last 0.650  best 0.650 @ 3
& two series in one place
: best.pt holds epoch 2 (@ a series' own best there)"""


def _hung(signum, frame):
    raise AssertionError("still drawing after 10 s: the plot hangs")


def parse(chart):
    """(plotting-area rows, {row: y tick label}, x axis line, lines after it) of a framed chart."""
    lines = chart.splitlines()
    borders = [i for i, ln in enumerate(lines) if re.fullmatch(r"\s*\+[-+]*\+", ln)]
    top, bottom = borders[0], borders[1]
    left = lines[top].index("+")
    rows = lines[top + 1:bottom]
    labels = {i: r[:left].strip() for i, r in enumerate(rows) if r[:left].strip()}
    return [r[left + 1:-1] for r in rows], labels, lines[bottom], lines[bottom + 1:]


class LinePlotTest(unittest.TestCase):
    def test_golden_two_series_with_a_mark(self):
        chart = pa.line_plot({"loss": [1.0, 0.6, 0.45, 0.4, 0.38, 0.37],
                              "val_loss": [1.1, 0.7, 0.55, 0.5, 0.52, 0.56]},
                             width=40, height=8, marks=[4])
        self.assertEqual(chart, GOLDEN_LINE)

    def test_one_glyph_per_series_and_the_legend_outside_the_area(self):
        series = {f"s{i}": [i, i + 1, i + 2] for i in range(5)}
        chart = pa.line_plot(series, width=50, height=12)
        rows, _, _, after = parse(chart)
        used = {c for r in rows for c in r if c != " "}
        self.assertEqual(used, set("*o+x#"))
        legend = [ln for ln in after if re.match(r"^[*o+x#] s\d", ln)]
        self.assertEqual([ln[0] for ln in legend], list("*o+x#"))
        self.assertTrue(all(len(ln) <= 50 for ln in chart.splitlines()))

    def test_y_ticks_are_round_steps_on_the_rows_they_name(self):
        for values in ([0.0, 1.0], [0.013, 0.87], [3.0, 250.0], [-2.0, 7.5]):
            chart = pa.line_plot({"a": values}, width=40, height=11)
            labels = parse(chart)[1]
            vals = [float(v) for v in labels.values()]
            steps = {round(b - a, 9) for a, b in zip(vals[1:], vals[:-1])}
            self.assertEqual(len(steps), 1, labels)
            step = steps.pop()
            mantissa = step / 10 ** math.floor(math.log10(step))
            self.assertIn(round(mantissa, 6), (1.0, 2.0, 5.0))
        # a value equal to a tick is drawn on that tick's row
        rows, labels, _, _ = parse(pa.line_plot({"a": [0.0, 1.0]}, width=30, height=5))
        zero = [i for i, s in labels.items() if float(s) == 0][0]
        one = [i for i, s in labels.items() if float(s) == 1][0]
        self.assertEqual(rows[zero][0], "*")
        self.assertEqual(rows[one][-1], "*")

    def test_x_ticks_are_whole_epochs(self):
        for n in (3, 7, 13, 50, 137):
            chart = pa.line_plot({"a": list(range(n))}, width=72, height=6)
            _, _, axis, after = parse(chart)
            labels = [int(t) for t in after[0].split()]
            self.assertEqual(labels[0], 1)
            self.assertLessEqual(labels[-1], n)
            self.assertEqual(axis.count("+") - 2, len(labels))  # one '+' per label

    def test_logy_labels(self):
        chart = pa.line_plot({"a": [1.0, 0.5, 0.2, 0.1]}, logy=True, width=40, height=12)
        self.assertEqual(list(parse(chart)[1].values()),
                         ["1", "0.5", "0.2", "0.1"])

    def test_ymin_and_spikes_survive_resampling(self):
        chart = pa.line_plot({"acc": [0.5, 0.9]}, ymin=0, width=30, height=6)
        self.assertEqual(list(parse(chart)[1].values())[-1], "0")
        values = [1.0] * 5000
        values[2500] = 100.0
        rows = parse(pa.line_plot({"a": values}, width=60, height=10))[0]
        self.assertIn("*", rows[0])  # the one spike among 5000 points reaches the top

    def test_a_best_only_where_the_direction_is_known(self):
        series = {"val_loss": [3, 1, 2], "val_acc": [0.2, 0.9, 0.5], "prec": [0.7, 0.4, 0.6]}
        chart = pa.line_plot(series)  # the loss is known; the others' names are not read
        self.assertIn("val_loss  last 2.000  best 1.000 @ 2", chart)
        self.assertRegex(chart, r"val_acc   last 0\.500\n")
        self.assertRegex(chart, r"prec      last 0\.600\n")
        chart = pa.line_plot(series, better={"val_acc": "max", "prec": "max"})
        self.assertIn("val_acc   last 0.500  best 0.900 @ 2", chart)
        self.assertIn("prec      last 0.600  best 0.700 @ 1", chart)  # not a "prec"-ision guess
        self.assertIn("val_loss  last 2.000  best 1.000 @ 2", chart)
        chart = pa.line_plot(series, better="max")  # one direction for every series
        self.assertIn("val_loss  last 2.000  best 3.000 @ 1", chart)
        chart = pa.line_plot(series, better={"val_loss": None})  # known to be unknown
        self.assertRegex(chart, r"val_loss  last 2\.000\n")

    def test_width_defaults_to_the_terminal_and_to_80_in_a_log(self):
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        code = ("import plots_ascii as pa\n"
                "print(pa.line_plot({'loss': [3, 1, 2]}, title='t'))\n"
                "print(pa.scatter([1, 2, 3], [3, 1, 2]))")
        p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                           text=True, timeout=300, env=env)
        widths = [len(ln) for ln in p.stdout.splitlines()]
        self.assertEqual(max(widths), 80, p.stdout)  # into a pipe: a log's 80
        import pty
        import struct
        import termios
        import fcntl
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 70, 0, 0))
        p = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=follower,
                             stderr=follower, env=env)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            out += chunk
        p.wait(timeout=300)
        os.close(leader)
        lines = out.decode().replace("\r\n", "\n").splitlines()
        self.assertEqual(max(len(ln) for ln in lines), 70, out)  # a 70-column terminal
        self.assertEqual(max(len(ln) for ln in pa.line_plot({"a": [1, 2]}, width=50)
                             .splitlines()), 50)  # width= still decides

    def test_never_raises_on_data(self):
        cases = {"empty": {}, "empty series": {"a": []}, "all nan": {"a": [NAN, NAN]},
                 "constant": {"a": [2, 2, 2]}, "one point": {"a": [0.5]},
                 "inf": {"a": [INF, -INF, 1.0, 2.0]}, "only inf": {"a": [INF]},
                 "nan gap": {"a": [1, NAN, 3]}, "logy zero": {"a": [0, 1, 10]}}
        for name, series in cases.items():
            chart = pa.line_plot(series, width=30, height=5, logy=name == "logy zero")
            self.assertEqual(chart, pa.line_plot(series, width=30, height=5,
                                                 logy=name == "logy zero"))  # deterministic
            self.assertIn("+---", chart, name)
        self.assertIn("(no data)", pa.line_plot({}))
        self.assertIn("(no finite values)", pa.line_plot({"a": [NAN, NAN]}))
        self.assertIn("(constant 2.000)", pa.line_plot({"a": [2, 2, 2]}))
        self.assertIn("(one point)", pa.line_plot({"a": [0.5]}))
        self.assertIn("2 clipped to the edge", pa.line_plot({"a": [INF, -INF, 1.0, 2.0]}))

    def test_extreme_finite_values_neither_hang_nor_raise(self):
        # 1e308 - (-1e308) overflows to inf, 5e-324 / 6 underflows to 0: the axis
        # arithmetic must survive both, and the labels stay short
        signal.signal(signal.SIGALRM, _hung)
        self.addCleanup(signal.alarm, 0)
        for values in ([1e308, -1e308], [5e-324, 0.0], [1.7e308, -1.7e308, 0.0],
                       [-5e-324, 5e-324]):
            signal.alarm(10)
            chart = pa.line_plot({"a": values}, width=40, height=6)
            rows, labels, _, _ = parse(chart)
            frame = [ln for ln in chart.splitlines() if ln.rstrip().endswith(("|", "+"))]
            self.assertTrue(all(len(ln) <= 40 for ln in frame), chart)
            self.assertEqual(rows[0][0] == "*", values[0] > values[1], chart)  # first at its end
            self.assertGreaterEqual(len(labels), 2, chart)
            ticks = [float(labels[r]) for r in sorted(labels)]
            self.assertEqual(ticks, sorted(ticks, reverse=True), chart)
            self.assertTrue(min(values) <= ticks[-1] < ticks[0] <= max(values), chart)
            hist = pa.histogram(values, bins=4)
            self.assertEqual(sum(int(re.search(r"[)\]] +(\d+)", ln)[1]) for ln in hist.splitlines()), len(values))
            line = pa.sparkline(values)
            self.assertEqual(line[values.index(max(values))], pa.SPARK[-1])
            self.assertEqual(line[values.index(min(values))], pa.SPARK[0])
            self.assertIn("+---", pa.scatter(values, values, width=40, height=6))
            self.assertEqual(len(pa.image([values], invert=True)), 2 * len(values))

    def test_nan_leaves_a_gap(self):
        rows = parse(pa.line_plot({"a": [1, 1, NAN, NAN, 1, 1]}, width=40, height=4))[0]
        cells = [any(r[c] == "*" for r in rows) for c in range(len(rows[0]))]
        self.assertTrue(cells[0] and cells[-1])
        self.assertIn(False, cells[5:-5])

    def test_ascii_by_default_and_no_colour(self):
        chart = pa.plot_history({"loss": [1, 0.5], "val_loss": [1.2, 0.7]})
        self.assertTrue(chart.isascii())
        self.assertNotIn("\x1b", chart)
        fancy = pa.line_plot({"a": [1, 2]}, unicode=True)
        self.assertFalse(fancy.isascii())
        self.assertNotIn("\x1b", fancy)


class ReadableChartsTest(unittest.TestCase):
    """Each chart says what it shows at a glance."""

    def columns_of(self, chart, glyphs):
        rows = parse(chart)[0]
        return sorted({c for r in rows for c, ch in enumerate(r) if ch in glyphs})

    def test_series_of_different_lengths_share_the_epoch_axis(self):
        chart = pa.line_plot({"ten": range(1, 11), "five": [1] * 5}, width=60, height=8)
        cols = len(parse(chart)[0][0])
        five = self.columns_of(chart, "o&")
        self.assertEqual(five[0], 0)
        self.assertEqual(five[-1], round(4 / 9 * (cols - 1)))  # epoch 5 of 10, not the edge
        self.assertIn("o five  last 1.000  5 of 10", chart)  # no direction: no best
        chart = pa.line_plot({"ten": range(1, 11), "five": [1] * 5}, better="min")
        self.assertIn("o five  last 1.000  best 1.000 @ 1  5 of 10", chart)

    def test_a_step_schedule_is_drawn_as_steps_with_no_best(self):
        chart = pa.line_plot({"lr": [0.1] * 5 + [0.01] * 5}, width=40, height=6)
        rows = parse(chart)[0]
        per_col = [sum(r[c] == "*" for r in rows) for c in range(len(rows[0]))]
        self.assertEqual(sum(1 for n in per_col if n > 1), 1)  # one vertical drop, no ramp
        self.assertEqual(per_col.index(max(per_col)), round(5 / 9 * (len(rows[0]) - 1)))
        self.assertTrue(chart.endswith("* lr  last 0.010"))  # a rate has no "best"

    def test_series_that_share_cells_show_it(self):
        chart = pa.line_plot({"loss": [3, 2, 1], "val_loss": [3, 2, 1.5]}, width=40, height=8)
        self.assertIn("&", "".join(parse(chart)[0]))
        self.assertIn("& two series in one place", chart)
        self.assertNotIn("&", pa.line_plot({"a": [1, 2], "b": [5, 6]}, height=12))

    def test_the_last_epoch_is_always_labelled(self):
        for n in (7, 14, 15, 30, 99):
            axis_labels = parse(pa.line_plot({"a": range(n)}, width=60))[3][0].split()
            self.assertEqual(axis_labels[0], "1")
            self.assertEqual(axis_labels[-1], str(n))

    def test_scatter_labels_round_values_along_x(self):
        chart = pa.scatter([-3.2, 0.1, 4.9], [1, 2, 3], width=60, height=6)
        labels = chart.splitlines()[-1].split()
        self.assertGreaterEqual(len(labels), 3)
        self.assertIn("0", labels)

    def test_histograms_on_shared_bins_and_scale_compare_bar_for_bar(self):
        a = pa.histogram([0.1] * 96, bins=4, width=40, value_range=(0, 1), top=96)
        b = pa.histogram([0.9] * 45, bins=4, width=40, value_range=(0, 1), top=96)
        bars = [ln.split()[-1] for ln in (a + "\n" + b).splitlines() if "#" in ln]
        self.assertEqual([len(x) for x in bars], [40, round(45 / 96 * 40)])
        edges = [[re.match(r"\[[^)\]]*[)\]]", ln).group() for ln in h.splitlines()]
                 for h in (a, b)]
        self.assertEqual(edges[0], edges[1])  # the same bins
        self.assertIn("(1 outside [0, 1.000] not counted)",
                      pa.histogram([0.5, 2], value_range=(0, 1)))


class LogXTest(unittest.TestCase):
    def test_a_log_x_axis_places_points_by_their_rate_and_labels_powers_of_ten(self):
        lrs = [1e-5 * 10 ** (i / 10) for i in range(51)]  # 1e-5 .. 1
        loss = [1.0 if v < 1e-2 else 0.2 for v in lrs]
        chart = pa.line_plot({"loss": loss}, x=lrs, logx=True, marks=[1e-2], width=60,
                             height=6, mark_label="suggested lr", xlabel="learning rate")
        rows, _, _, after = parse(chart)
        cols = len(rows[0])
        self.assertEqual(after[0].split(), ["1e-05", "0.0001", "0.001", "0.01", "0.1", "1"])
        mark = next(c for c in range(cols) if all(r[c] in ":@*&" for r in rows))
        self.assertEqual(mark, round(3 / 5 * (cols - 1)))  # 1e-2 is 3/5 of the way in log
        low = [c for c in range(cols) if rows[-1][c] in "*@"]
        self.assertEqual(low[0], mark)  # the drop happens at 1e-2 on the log axis
        self.assertIn("best 0.200 @ 0.010", chart)
        self.assertIn(": suggested lr 0.010", chart)
        with self.assertRaisesRegex(ValueError, "logx needs positive x"):
            pa.line_plot({"a": [1, 2]}, x=[0, 1], logx=True)
        with self.assertRaisesRegex(ValueError, "3 x values for 2 points"):
            pa.line_plot({"a": [1, 2]}, x=[1, 2, 3])


class PlotHistoryTest(unittest.TestCase):
    def test_golden_every_chart_marks_the_epoch_fit_kept(self):
        # best_epoch is what fit records: the epoch best.pt holds after each epoch
        h = {"epoch": [1, 2, 3], "loss": [0.9, 0.5, 0.4], "val_loss": [1.0, 0.6, 0.7],
             "acc": [0.5, 0.7, 0.8], "val_acc": [0.4, 0.6, 0.65], "lr": [0.1] * 3,
             "time": [1.0] * 3, "best_epoch": [1, 2, 2]}
        better = {"acc": "max", "val_acc": "max"}  # as fit's history.better says
        charts = pa.plot_history(h, width=30, height=5, better=better).split("\n\n")
        self.assertEqual(len(charts), 2)  # loss and acc: best_epoch is not drawn
        self.assertEqual(charts[1], GOLDEN_HISTORY_ACC)  # acc is best at 3, fit kept 2
        for chart in charts:
            self.assertIn(": best.pt holds epoch 2", chart)
        # the mark follows the column, whatever the values say (fit's min_delta, its mode)
        charts = pa.plot_history({**h, "best_epoch": [1, 1, 3]}, monitor="val_acc")
        self.assertEqual(charts.count(": best val_acc, epoch 3"), 2)
        # no column, no mark: nothing is decided here again
        self.assertNotIn(": ", pa.plot_history({"loss": [1, 2, 1]}))
        self.assertNotIn(": ", pa.plot_history({**h, "best_epoch": [math.nan] * 3}))
        with self.assertRaisesRegex(ValueError, "monitor 'val_f1' is not in the history"):
            pa.plot_history(h, monitor="val_f1")

    def test_accuracy_is_not_squeezed_from_zero(self):
        h = {"acc": [0.90, 0.95, 0.97]}
        _, labels, _, _ = parse(pa.plot_history(h, width=30, height=6))
        self.assertNotIn("0", labels.values())

    def test_one_chart_per_metric_train_beside_val(self):
        h = {"loss": [2, 1], "rmse": [1.4, 1], "mae": [1, 0.8], "val_loss": [2.1, 1.2],
             "val_rmse": [1.45, 1.1], "val_mae": [1.1, 0.9]}
        charts = pa.plot_history(h).split("\n\n")
        self.assertEqual(len(charts), 3)
        for chart, name in zip(charts, ("loss", "rmse", "mae")):
            self.assertEqual(chart.splitlines()[0].strip(), name)
            self.assertRegex(chart, rf"\n. {name} +last")
            self.assertRegex(chart, rf"\n. val_{name} +last")
        self.assertEqual(pa.plot_history(h, keys=["mae"]).count("\n\n"), 0)
        with self.assertRaisesRegex(ValueError, "no \\['acc'\\]"):
            pa.plot_history(h, keys=["acc"])


class OtherChartsTest(unittest.TestCase):
    def test_histogram(self):
        self.assertEqual(pa.histogram([0.1, 0.2, 0.25, 0.9, NAN, INF], bins=4, width=20,
                                      title="h"),
                         "h\n[0.10, 0.30) 3 ####################\n[0.30, 0.50) 0\n"
                         "[0.50, 0.70) 0\n[0.70, 0.90] 1 #######\n"
                         "(1 NaN and 1 inf not counted)")
        self.assertEqual(pa.histogram([]), "(no data)")
        self.assertEqual(pa.histogram([3, 3, 3]).count("\n"), 0)  # one bin
        counts = [int(re.search(r"[)\]] +(\d+)", ln).group(1))
                  for ln in pa.histogram(list(range(100)), bins=7).splitlines()]
        self.assertEqual((len(counts), sum(counts)), (7, 100))

    def test_bar_chart(self):
        self.assertEqual(pa.bar_chart({"a": 3, "bb": 1.5, "c": -1}, width=10),
                         " a | ########## 3.000\nbb | ##### 1.500\n c | --- -1.000")
        self.assertEqual(pa.bar_chart({}), "(no data)")

    def test_matrix_counts_and_row_percentages(self):
        self.assertEqual(pa.matrix([[5, 1], [2, 12]], title="confusion"),
                         "confusion\n  |  0  1\n--+------\n0 |  5  1\n1 |  2 12")
        self.assertEqual(pa.matrix([[5, 1], [2, 12]], percent=True, row_labels=["a", "b"]),
                         "  |   0   1\n--+--------\na | 83% 17%\nb | 14% 86%")

    def test_image(self):
        self.assertEqual(pa.image([[0, 0.5, 1], [1, 0.2, 0]]), "  ++@@\n@@::")
        self.assertEqual(pa.image([[0, 0.5, 1]], invert=True), "@@==  ")
        self.assertEqual(pa.image([[[0, 255], [255, 0]]]), "  @@\n@@")  # (1, H, W), 0-255
        self.assertEqual(pa.image([[-1.0, 1.0]]), "  @@")  # weights: scaled min to max

    def test_scatter_uses_the_label_as_marker(self):
        chart = pa.scatter([0, 1, 2, 3], [0, 1, 0, 1], labels=[1, 2, 1, 2], width=30, height=6)
        rows = parse(chart)[0]
        self.assertEqual(rows[-1].replace(" ", ""), "11")
        self.assertEqual(rows[0].replace(" ", ""), "22")
        named = pa.scatter([0, 1], [0, 1], labels=["cat", "dog"])
        self.assertIn("* cat  o dog", named)
        self.assertIn("(1 non-finite points not drawn)", pa.scatter([0, NAN], [1, 1]))

    def test_sparkline(self):
        self.assertEqual(pa.sparkline([1, 2, 3, NAN, 5]), "_:+ @")
        self.assertEqual(pa.sparkline([]), "")
        self.assertEqual(pa.sparkline([2, 2]), "++")


class InputsTest(unittest.TestCase):
    def test_numpy_arrays_and_tensors(self):
        import numpy as np
        import torch
        ref = pa.line_plot({"a": [0.5, 0.25, 0.125]})
        self.assertEqual(pa.line_plot({"a": np.array([0.5, 0.25, 0.125])}), ref)
        self.assertEqual(pa.line_plot({"a": torch.tensor([0.5, 0.25, 0.125])}), ref)
        self.assertEqual(pa.line_plot({"a": (0.5, 0.25, 0.125)}), ref)
        self.assertEqual(pa.image(torch.tensor([[[0.0, 1.0]]])), "  @@")
        self.assertEqual(pa.matrix(np.array([[1, 2], [3, 4]])), pa.matrix([[1, 2], [3, 4]]))

    def test_works_with_numpy_and_torch_unimportable(self):
        code = ("import sys; sys.modules['numpy'] = None; sys.modules['torch'] = None\n"
                "import plots_ascii as pa\n"
                "print(pa.plot_history({'loss': [1, 0.5], 'val_loss': [1.1, 0.7]}))\n"
                "print(pa.histogram([1, 2, 3]), pa.image([[0, 1]]), pa.sparkline([1, 2]))\n"
                "print(sorted(m for m in sys.modules if m in ('numpy', 'torch')))")
        p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                           text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("val_loss  last 0.700", p.stdout)

    def test_non_numbers_get_a_clear_error(self):
        with self.assertRaisesRegex(TypeError, "series 'a': expected numbers, got str"):
            pa.line_plot({"a": [1, "x"]})


class CliTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.paths = []
        for name, scale in (("a", 1.0), ("b", 2.0)):
            os.makedirs(os.path.join(self.dir.name, name))
            path = os.path.join(self.dir.name, name, "history.csv")
            with open(path, "w") as f:
                f.write("epoch,loss,val_loss,lr,time\n")
                for e in range(1, 6):
                    f.write(f"{e},{scale / e},{scale / e + 0.1},0.1,0.5\n")
            self.paths.append(path)

    def cli(self, *args):
        return subprocess.run([sys.executable, os.path.join(HERE, "plots_ascii.py"), *args],
                              capture_output=True, text=True, timeout=300)

    def test_one_chart_per_key_one_series_per_run(self):
        p = self.cli(*self.paths, "--keys", "loss,val_loss", "--width", "50", "--height", "8")
        self.assertEqual(p.returncode, 0, p.stderr)
        charts = p.stdout.strip().split("\n\n")
        self.assertEqual(len(charts), 2)
        self.assertEqual(charts[0].splitlines()[0].strip(), "loss")
        self.assertIn("* a  last 0.200  best 0.200 @ 5", charts[0])
        self.assertIn("o b  last 0.400  best 0.400 @ 5", charts[0])
        self.assertTrue(all(len(ln) <= 50 for ln in p.stdout.splitlines()))
        p = self.cli(*self.paths)
        self.assertEqual(p.stdout.count("\n\n"), 2)  # loss, val_loss, lr (not epoch or time)

    def test_errors_are_one_line_and_exit_2(self):
        bad = os.path.join(self.dir.name, "bad.csv")
        with open(bad, "w") as f:
            f.write("epoch,loss\n1,zero\n")
        binary = os.path.join(self.dir.name, "model.pt")
        with open(binary, "wb") as f:
            f.write(bytes(range(256)) * 4)
        huge = os.path.join(self.dir.name, "huge.csv")
        with open(huge, "w") as f:
            f.write('epoch,loss\n1,"' + "9" * 200_000 + '"\n')
        cases = {"missing.csv": [os.path.join(self.dir.name, "missing.csv")], "bad.csv": [bad],
                 "'acc'": [self.paths[0], "--keys", "acc"], "no history.csv given": [],
                 "model.pt: not a text file": [binary],
                 "argument --width: expected a whole number, got 'abc'":
                     [self.paths[0], "--width", "abc"],
                 "argument --height: expected at least 3": [self.paths[0], "--height", "1"],
                 "argument --height: expected at least 3, got 0": [self.paths[0], "--height",
                                                                   "0"],
                 "huge.csv: not a CSV file": [huge]}
        for says, args in cases.items():
            p = self.cli(*args)
            self.assertEqual(p.returncode, 2, args)
            self.assertEqual(p.stdout, "")
            self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
            self.assertTrue(p.stderr.startswith("plots_ascii: "))
            self.assertIn(says, p.stderr)

    def test_values_at_the_ends_of_the_float_range_are_drawn(self):
        path = os.path.join(self.dir.name, "extreme.csv")
        with open(path, "w") as f:
            f.write("epoch,loss\n1,1e308\n2,-1e308\n3,5e-324\n")
        p = self.cli(path, "--width", "50", "--height", "8")  # hung forever before
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("1e+308", p.stdout)
        self.assertIn("-1e+308", p.stdout)

    def test_runs_of_different_lengths_share_the_epoch_axis(self):
        short = os.path.join(self.dir.name, "c", "history.csv")
        os.makedirs(os.path.dirname(short))
        with open(short, "w") as f:
            f.write("epoch,loss\n1,1.0\n2,0.5\n")
        p = self.cli(self.paths[0], short, "--keys", "loss")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("o c  last 0.500  best 0.500 @ 2  2 of 5", p.stdout)
        cols = len(parse(p.stdout.split("\n", 1)[1])[0][0])
        rows = parse(p.stdout.split("\n", 1)[1])[0]
        self.assertLessEqual(max(c for r in rows for c, ch in enumerate(r) if ch in "o&"),
                             round(1 / 4 * (cols - 1)))

    def test_a_closed_pipe_ends_quietly(self):
        long = os.path.join(self.dir.name, "long.csv")
        with open(long, "w") as f:
            f.write("epoch,loss\n" + "".join(f"{e},{1 / e}\n" for e in range(1, 200)))
        p = subprocess.run(f"{sys.executable} {os.path.join(HERE, 'plots_ascii.py')} {long} "
                           f"{long} {long} --keys " + ",".join(["loss"] * 100) + " "
                           "| head -1", shell=True, capture_output=True, text=True, timeout=300)
        self.assertEqual(p.stdout.strip(), "loss")
        self.assertEqual(p.stderr, "")


if __name__ == "__main__":
    unittest.main()
