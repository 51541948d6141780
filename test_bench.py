"""The benchmark runs and prints its table (timings are never asserted: machines are noisy)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


class BenchSmokeTest(unittest.TestCase):
    def test_quick_bench_prints_its_table_and_writes_json(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "results.json")
            p = subprocess.run([sys.executable, os.path.join(HERE, "bench", "bench.py"),
                                "--quick", "--rounds", "1", "--only", "pima", "--out", out],
                               capture_output=True, text=True, timeout=300)
            self.assertEqual(p.returncode, 0, p.stderr[-3000:])
            with open(out) as f:
                results = json.load(f)
        lines = p.stdout.splitlines()
        header = next(ln for ln in lines if ln.startswith("workload")).split()[1:]
        # Installed frameworks (bench/peers.py) add columns between fit_silent and "hand s".
        self.assertEqual(header[:4], ["hand", "dataloader", "fit", "fit_silent"])
        self.assertEqual(header[-2:], ["hand", "s"])
        columns = len(header) - 2
        for name in ("pima-like",):  # --only pima: the other rows are left out
            row = next(ln for ln in lines if ln.startswith(name))
            ratios = [float(v) for v in row.split()[-1 - columns:-1]]
            self.assertEqual(ratios[0], 1.0)  # the hand loop is the unit
            self.assertTrue(all(r > 0 for r in ratios))
            self.assertEqual(set(results["workloads"][next(
                k for k in results["workloads"] if k.startswith(name))]["ratios"]),
                set(header[:columns]))
        self.assertEqual(len(results["workloads"]), 1)
        self.assertFalse(any(ln.startswith(("housing-like", "mnist-like")) for ln in lines))
        for key in ("overhead_us", "scaling", "memory", "line_plot_10k_ms", "import_ms"):
            self.assertIn(key, results)
        # each technique against the same technique written by hand, on every workload
        self.assertEqual(set(results["techniques"]), {"bf16 autocast", "accumulate 4"})
        for technique in results["techniques"].values():
            self.assertEqual(len(technique), 1)  # --quick: the pima workload only
            for r in technique.values():
                self.assertEqual(r["ratios"]["hand"], 1.0)
                self.assertGreater(r["ratios"]["fit"], 0)
        self.assertRegex(p.stdout, r"accumulate 4 +pima-like.* fit [\d.]+ \(")
        self.assertRegex(p.stdout, r"-?[\d.]+ us per step, -?\d+ us per epoch")  # noise may go below 0
        self.assertRegex(p.stdout, r"line_plot, 10,000 points at 72x18: [\d.]+ ms")

    def test_memory_runs_report_the_peak_a_training_call_adds(self):
        # bench.py --memory runs each of these in a process of its own; two, tiny, here
        runs = [subprocess.Popen([sys.executable, os.path.join(HERE, "bench", "bench.py"),
                                  "--memory-one", run, "0.2", "--quick"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for run in ("hand", "fit + accuracy + validation + checkpoint")]
        for p in runs:
            out, err = p.communicate(timeout=300)
            self.assertEqual(p.returncode, 0, err[-3000:])
            peak = json.loads(out.splitlines()[-1])["peak_mb"]
            self.assertGreater(peak, 0)  # the call's own: the data was there before it


if __name__ == "__main__":
    unittest.main()
