"""Tests of plots_ascii.py: golden strings where output is fixed, properties elsewhere."""
import math
import os
import re
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
1.0 +*ooo                :             |
    | **oo               :             |
0.8 +   *ooo             :             |
    |    **ooooo         :             |
0.6 +      ****ooooooo   :      ooooooo|
    |          ******oooo@ooooooo      |
0.4 +                 *****************|
    ++------+-----+------+-----+------++
     1      2     3      4     5      6
                   epoch
* loss      last 0.370  best 0.370 @ 6
o val_loss  last 0.560  best 0.500 @ 4
: @ marked 4"""

GOLDEN_HISTORY_ACC = """\
             acc
    +------------------------+
0.8 +            ***********@|
0.6 +******ooooooooooooooooo@|
0.4 +ooooooo                :|
0.2 +                       :|
  0 +                       :|
    ++-----------+----------++
     1           2          3
              epoch
* acc      last 0.800  best 0.800 @ 3
o val_acc  last 0.650  best 0.650 @ 3
: @ marked 3"""


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

    def test_best_is_min_for_losses_and_max_for_accuracy(self):
        chart = pa.line_plot({"val_loss": [3, 1, 2], "val_acc": [0.2, 0.9, 0.5]})
        self.assertIn("val_loss  last 2.000  best 1.000 @ 2", chart)
        self.assertIn("val_acc   last 0.500  best 0.900 @ 2", chart)

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


class PlotHistoryTest(unittest.TestCase):
    def test_golden_accuracy_chart_from_zero_with_the_best_epoch(self):
        h = {"epoch": [1, 2, 3], "loss": [0.9, 0.5, 0.4], "val_loss": [1.0, 0.6, 0.7],
             "acc": [0.5, 0.7, 0.8], "val_acc": [0.4, 0.6, 0.65], "lr": [0.1] * 3,
             "time": [1.0] * 3}
        charts = pa.plot_history(h, width=30, height=5).split("\n\n")
        self.assertEqual(len(charts), 2)
        self.assertEqual(charts[1], GOLDEN_HISTORY_ACC)
        self.assertIn(": @ marked 2", charts[0])  # val_loss is lowest at epoch 2

    def test_rmse_and_mae_share_one_chart(self):
        h = {"loss": [2, 1], "rmse": [1.4, 1], "mae": [1, 0.8], "val_loss": [2.1, 1.2],
             "val_rmse": [1.45, 1.1], "val_mae": [1.1, 0.9]}
        charts = pa.plot_history(h).split("\n\n")
        self.assertEqual(len(charts), 2)
        self.assertIn("rmse / mae", charts[1])
        for name in ("rmse", "val_rmse", "mae", "val_mae"):
            self.assertRegex(charts[1], rf"\n. {name} +last")
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
                           text=True, timeout=60)
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
                              capture_output=True, text=True, timeout=60)

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
        for args in ([os.path.join(self.dir.name, "missing.csv")], [bad],
                     [self.paths[0], "--keys", "acc"], []):
            p = self.cli(*args)
            self.assertEqual(p.returncode, 2, args)
            self.assertEqual(p.stdout, "")
            self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
            self.assertTrue(p.stderr.startswith("plots_ascii: "))


if __name__ == "__main__":
    unittest.main()
