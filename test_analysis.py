"""Tests of analysis.py on small inputs with exact expectations."""
import math
import os
import re
import subprocess
import sys
import unittest

import torch

import analysis
import datasets
import loops
import plots_ascii
from test_plots import parse

HERE = os.path.dirname(os.path.abspath(__file__))


class PredictionsTest(unittest.TestCase):
    def test_probabilities_labels_and_confidence(self):
        model = torch.nn.Linear(2, 3)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
            model.bias.zero_()
        X = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
        p = analysis.predictions(model, X)
        self.assertTrue(torch.allclose(p["probs"].sum(1), torch.ones(3)))
        self.assertEqual(p["labels"].tolist(), [0, 1, 0])  # a tie goes to the first class
        e2 = math.exp(2)
        self.assertAlmostEqual(p["confidence"][0].item(), e2 / (e2 + 2), places=6)
        self.assertAlmostEqual(p["confidence"][2].item(), 1 / 3, places=6)


class ConfusionTest(unittest.TestCase):
    def test_known_matrix_and_per_class_accuracy(self):
        y = torch.tensor([0, 0, 0, 1, 1, 2])
        pred = torch.tensor([0, 0, 1, 1, 2, 2])
        view = analysis.confusion_view(pred, y, 3)
        self.assertIn("  | 0 1 2\n--+------\n0 | 2 1 0\n1 | 0 1 1\n2 | 0 0 1", view)
        self.assertIn("accuracy per class (overall 66.7% of 6)", view)
        # each class's share with the counts behind it, not "66.667" on three samples
        self.assertRegex(view, r"0 \| #+ 67% \(2/3\)\n1 \| #+ 50% \(1/2\)\n2 \| #+ 100% \(1/1\)")


class SummaryTest(unittest.TestCase):
    def test_rows_in_forward_order_and_totals_against_numel(self):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3),
                                                    torch.nn.BatchNorm2d(4), torch.nn.ReLU())
                self.head = torch.nn.Linear(4 * 6 * 6, 3)
                self.tied = torch.nn.Linear(3, 3)
                self.tied2 = torch.nn.Linear(3, 3)
                self.tied2.weight = self.tied.weight  # a shared parameter, counted once

            def forward(self, x):
                h = self.head(self.features(x).flatten(1))
                return self.tied(h), {"aux": self.tied2(h)}
        model = Net()
        model.features[0].requires_grad_(False)  # frozen
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        text = analysis.summary(model, torch.randn(2, 1, 8, 8))
        names = [ln.split()[0] for ln in text.splitlines()[2:-1]]
        self.assertEqual(names, ["features", "features.0", "features.1", "features.2", "head",
                                 "tied", "tied2", "(output)"])
        self.assertIn("features.0  Conv2d       (2, 4, 6, 6)", text)
        self.assertIn("[(2, 3), {aux: (2, 3)}]", text)
        unique = {id(p): p for p in model.parameters()}.values()
        total = sum(p.numel() for p in unique)
        frozen = sum(p.numel() for p in unique if not p.requires_grad)
        self.assertLess(total, sum(p.numel() for _, p in
                                   model.named_parameters(remove_duplicate=False)))
        self.assertIn(f"parameters: {total:,} ({total - frozen:,} trainable, {frozen:,} "
                      "non-trainable)", text)
        self.assertTrue(model.training and model.features[1].training)  # mode as it was
        for k, v in model.state_dict().items():  # BatchNorm's running stats untouched
            self.assertTrue(torch.equal(v, before[k]), k)
        self.assertEqual(sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                             for m in model.modules()), 0)


class SummaryBuffersTest(unittest.TestCase):
    def test_buffers_a_forward_changes_in_eval_mode_are_as_they_were(self):
        class Counting(torch.nn.Module):  # updates one buffer in place, replaces another
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(3, 2)
                self.register_buffer("calls", torch.zeros((), dtype=torch.long))
                self.register_buffer("last", torch.zeros(3), persistent=False)

            def forward(self, x):
                self.calls += 1
                self.last = x.mean(0)
                return self.lin(x)
        model = torch.nn.Sequential(Counting(), torch.nn.ReLU())
        inner = model[0]
        calls, last = inner.calls, inner.last
        analysis.summary(model, torch.randn(4, 3))
        self.assertIs(inner.calls, calls)
        self.assertIs(inner.last, last)  # the same tensor objects, back in their places
        self.assertEqual(inner.calls.item(), 0)
        self.assertTrue(torch.equal(inner.last, torch.zeros(3)))
        self.assertEqual(list(inner._buffers), ["calls", "last"])
        model(torch.randn(4, 3))  # the buffers still work as buffers
        self.assertEqual(inner.calls.item(), 1)


class TsneTest(unittest.TestCase):
    def test_well_separated_clusters_stay_separated_and_kl_falls(self):
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(3, 20, generator=g) * 10
        labels = torch.arange(3).repeat_interleave(60)
        X = centers[labels] + torch.randn(180, 20, generator=g)
        coords, kl = analysis.tsne_2d(X, perplexity=20, steps=400, seed=1)
        self.assertEqual(tuple(coords.shape), (180, 2))
        self.assertLess(kl[-1], kl[0])
        # every point is nearer its own cluster's centre than any other's
        means = torch.stack([coords[labels == c].mean(0) for c in range(3)])
        nearest = torch.cdist(coords, means).argmin(1)
        self.assertTrue(torch.equal(nearest, labels))
        again, _ = analysis.tsne_2d(X, perplexity=20, steps=400, seed=1)
        self.assertTrue(torch.equal(coords, again))  # seeded and repeatable
        view = analysis.tsne_view(X, labels, title="clusters", steps=200)
        self.assertIn("clusters: t-SNE, perplexity 30, KL", view)
        self.assertEqual(set("".join(view.splitlines()[2:-2])) & set("0123"), set("012"))

    def test_kl_is_close_to_scikit_learns_where_it_is_installed(self):
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            self.skipTest("scikit-learn is not installed (it is never a requirement)")
        import numpy as np
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency
        X = datasets.digits(n=600, seed=2)[0][0][:250].reshape(250, -1)
        _, kl = analysis.tsne_2d(X, perplexity=30, steps=1000, seed=0)
        with threadpool_limits(1):  # BLAS threads waiting on a busy core took minutes
            sk = TSNE(perplexity=30, init="random", random_state=0, method="exact").fit(
                np.asarray(X, dtype=np.float64))
        self.assertLess(kl[-1], sk.kl_divergence_ * 1.15)

    def test_affinities_are_scikit_learns_over_the_nearest_neighbours(self):
        g = torch.Generator().manual_seed(3)
        X = torch.randn(300, 6, generator=g, dtype=torch.float64)
        starts, rows, cols, p = analysis._affinities(X, 10.0)
        self.assertAlmostEqual(float(p.sum()), 1.0, places=12)
        P = torch.zeros(300, 300, dtype=torch.float64)
        P[rows, cols] = p
        self.assertTrue(torch.equal(P, P.T))  # symmetric
        self.assertTrue(torch.equal(starts[1:] - starts[:-1], torch.bincount(rows, minlength=300)))
        try:
            from sklearn.manifold._t_sne import _joint_probabilities_nn
            from sklearn.neighbors import NearestNeighbors
        except ImportError:
            return
        k = int(3 * 10.0 + 1)
        graph = NearestNeighbors(n_neighbors=k).fit(X.numpy()).kneighbors_graph(mode="distance")
        graph.data **= 2
        want = _joint_probabilities_nn(graph, 10.0, 0).toarray()
        want = torch.from_numpy(want)
        self.assertTrue(torch.equal(P > 0, want > 0))  # the same pairs
        self.assertLess(((P - want).abs().max() / want.max()).item(), 1e-3)  # bisection's tol

    def test_rows_that_are_not_finite_are_refused_by_row_and_scale_does_not_matter(self):
        g = torch.Generator().manual_seed(4)
        X = torch.randn(120, 5, generator=g, dtype=torch.float64)
        for bad in (math.nan, math.inf, -math.inf):
            Z = X.clone()
            Z[17, 2] = bad
            with self.assertRaisesRegex(ValueError, "row 17 of the points is not finite"):
                analysis.tsne_2d(Z, steps=5)
        small, _ = analysis.tsne_2d(X, steps=60)
        for huge in ((X * 1e200).tolist(), (X * 1e200).numpy()):  # a list: not float32
            coords, kl = analysis.tsne_2d(huge, steps=60)
            self.assertTrue(torch.isfinite(coords).all() and math.isfinite(kl[-1]))
            self.assertLess((coords - small).abs().max().item(), 1e-3)

    def test_tsne_view_wants_a_label_per_point_and_draws_three_points(self):
        with self.assertRaisesRegex(ValueError, "200 points and 100 labels; expected one label "
                                                "per point"):
            analysis.tsne_view(torch.randn(200, 5), torch.arange(100), title="x")
        with self.assertRaisesRegex(ValueError, "pca_view: 200 points and 100 labels"):
            analysis.pca_view(torch.randn(200, 5), torch.arange(100), title="x")
        view = analysis.tsne_view(torch.randn(3, 5), torch.arange(3), title="three", steps=20)
        self.assertIn("three: t-SNE, perplexity 1,", view)  # the one it chose, not 30
        inside = "".join(re.split(r"[|+]", line, maxsplit=1)[-1]
                         for line in view.splitlines()[2:-1])  # past the y axis' ticks
        self.assertEqual(sorted(c for c in inside if c.isdigit()), ["0", "1", "2"])

    def test_memory_grows_with_the_points_not_their_square(self):
        # 8,000 points: one N x N float64 matrix alone would be 512 MB (the map: ~150 MB)
        code = ("import resource, torch, analysis\n"
                "X = torch.randn(8000, 10, generator=torch.Generator().manual_seed(0))\n"
                "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "coords, kl = analysis.tsne_2d(X, steps=2)\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "
                "tuple(coords.shape))\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "PYTHONPATH": HERE})
        self.assertEqual(out.returncode, 0, out.stderr)
        grown, shape = out.stdout.split(" ", 1)
        self.assertEqual(shape.strip(), "(8000, 2)")
        self.assertLess(int(grown) * 1024, 320 * 2 ** 20)  # ru_maxrss is in KiB


class MistakesTest(unittest.TestCase):
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95]])
    y = torch.tensor([0, 0, 1, 1, 0])

    def test_top_mistakes_most_confident_first(self):
        found = analysis.top_mistakes(self.probs, self.y, n=2)
        self.assertEqual([m["index"] for m in found], [4, 1])
        self.assertEqual(found[0], {"index": 4, "true": 0, "p_true": self.probs[4, 0].item(),
                                    "pred": 1, "p_pred": self.probs[4, 1].item()})
        self.assertEqual(len(analysis.top_mistakes(self.probs, self.y, n=10)), 3)
        self.assertEqual(analysis.top_mistakes(self.probs, self.probs.argmax(1)), [])

    def test_mistakes_drawn_side_by_side_with_captions(self):
        X = torch.rand(5, 1, 28, 28)
        view = analysis.mistakes_view(X, self.probs, self.y, n=3, per_row=2)
        rows = view.split("\n\n")
        self.assertEqual(len(rows), 2)  # 3 images, 2 per row
        self.assertTrue(rows[0].startswith("true 0 (0.05)"))
        self.assertIn("said 1 (0.95)", rows[0].splitlines()[1])
        self.assertEqual(len(rows[0].splitlines()), 2 + 14)  # two caption lines, 28 / 2 rows
        first = plots_ascii.image(analysis._small(X[4], 2).tolist()).splitlines()[0]
        self.assertTrue(rows[0].splitlines()[2].startswith(first.rstrip()))
        self.assertEqual(analysis.mistakes_view(X, self.probs, self.probs.argmax(1)),
                         "no mistakes")


class RepresentationsTest(unittest.TestCase):
    def test_activations_by_hook_equal_the_layer_output(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        X = torch.randn(10, 4)
        got = analysis.activations(model, model[1], X, batch_size=3)
        with torch.no_grad():  # batches of 3 against one batch: equal up to float rounding
            self.assertTrue(torch.allclose(got, model[1](model[0](X)), atol=1e-6))
        self.assertEqual(len(model[1]._forward_hooks), 0)  # the hook is gone

    def test_pca_of_points_on_a_line(self):
        t = torch.linspace(-1, 1, 21)
        direction = torch.tensor([3.0, 4.0, 0.0]) / 5
        points = t[:, None] * direction + torch.tensor([1.0, 2.0, 3.0])
        coords, explained = analysis.pca_2d(points)
        self.assertAlmostEqual(explained[0], 1.0, places=6)
        self.assertAlmostEqual(explained[1], 0.0, places=6)
        self.assertTrue(torch.allclose(coords[:, 0], t, atol=1e-5))  # sign fixed: +t
        self.assertTrue(torch.allclose(coords[:, 1], torch.zeros(21), atol=1e-5))
        again, _ = analysis.pca_2d(points.flip(0))
        self.assertTrue(torch.allclose(again[:, 0], t.flip(0), atol=1e-5))

    def test_pca_view_marks_each_point_with_its_class(self):
        points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
        view = analysis.pca_view(points, torch.tensor([1, 2, 3, 4]), title="t", width=30,
                                 height=6)
        self.assertIn("t: PCA, axes explain 80% and 20% of the variance", view)
        area = "".join(parse(view)[0])
        self.assertEqual(sorted(c for c in area if c != " "), ["1", "2", "3", "4"])

    def test_weights_as_images(self):
        layer = torch.nn.Linear(784, 5)
        with torch.no_grad():
            layer.weight.copy_(torch.arange(5.0)[:, None].expand(5, 784) + torch.linspace(0, 1, 784))
        view = analysis.weights_view(layer, n=4, per_row=2)
        self.assertEqual(view.count("unit "), 4)
        self.assertEqual(len(view.splitlines()), 2 * (1 + 14) + 1)  # two rows of two images

    def test_views_of_other_image_sizes(self):
        small = torch.nn.Linear(64, 5)  # an MLP on 8 x 8 digits: its own square, drawn whole
        view = analysis.weights_view(small, n=2, per_row=2)
        self.assertEqual(len(view.splitlines()), 1 + 8)
        self.assertEqual(max(len(ln) for ln in view.splitlines()[1:]), 2 * 8 * 2 + 3)  # 2 a pixel
        wide = analysis.weights_view(torch.nn.Linear(96, 2), shape=(8, 12), n=1)
        self.assertEqual(len(wide.splitlines()), 1 + 8)
        self.assertEqual(max(len(ln) for ln in wide.splitlines()[1:]), 12 * 2)
        with self.assertRaisesRegex(ValueError, r"90 inputs make no square image; pass "
                                                r"shape=\(H, W\) with H \* W = 90"):
            analysis.weights_view(torch.nn.Linear(90, 2))
        with self.assertRaisesRegex(ValueError, r"shape=\(28, 28\) holds 784 pixels, the layer "
                                                r"has 64 inputs"):
            analysis.weights_view(small, shape=(28, 28))
        probs = torch.tensor([[0.05, 0.95], [0.9, 0.1], [0.2, 0.8]])
        view = analysis.mistakes_view(torch.rand(3, 8, 8), probs, torch.tensor([0, 1, 0]))
        first = view.splitlines()
        self.assertTrue(first[0].startswith("true 0 (0.05)   "))  # whole, not "true 0 ("
        self.assertTrue(first[1].startswith("said 1 (0.95)   "))
        self.assertEqual(len(first), 2 + 8)  # 8 x 8 images drawn whole


class TrainingViewsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        train, val, _ = datasets.digits(n=1500, seed=3)
        torch.manual_seed(0)
        cls.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64),
                                        torch.nn.ReLU(), torch.nn.Linear(64, 10))
        cls.tracker = analysis.ConfidenceTracker(cls.model, val)
        loops.fit(cls.model, train, torch.nn.CrossEntropyLoss(),
                  torch.optim.Adam(cls.model.parameters(), 3e-3), epochs=4, batch_size=32,
                  verbose=0, seed=0, on_epoch_end=cls.tracker)

    def test_confidence_moves_up_from_the_first_epoch_to_the_last(self):
        first, last = self.tracker.first, self.tracker.last
        self.assertEqual((first["epoch"], last["epoch"]), (1, 4))
        self.assertGreater(last["confidence"].mean(), first["confidence"].mean())
        self.assertGreater(last["p_true"].mean(), first["p_true"].mean())
        view = self.tracker.view()
        self.assertEqual(view.count("\n\n"), 3)  # four histograms
        self.assertIn("largest probability, epoch 1 (mean", view)
        self.assertIn("probability of the true label, epoch 4 (mean", view)
        charts = [c.splitlines()[1:] for c in view.split("\n\n")]
        for first_chart, last_chart in (charts[:2], charts[2:]):  # first above last
            rows = [re.match(r"(\[.*?[)\]]) +(\d+) ?(#*)$", ln).groups()
                    for ln in first_chart + last_chart]
            self.assertEqual([r[0] for r in rows[:10]], [r[0] for r in rows[10:]])  # same bins
            self.assertEqual(rows[0][0].replace(" ", ""), "[0,0.10)")  # over [0, 1] both
            top = max(int(r[1]) for r in rows)
            for _, count, bar in rows:  # one scale: equal counts, equal bars
                self.assertEqual(len(bar), round(int(count) / top * 40))

    def test_imagine_finds_an_input_the_model_is_sure_of(self):
        self.model.train()
        grads = [q.grad.clone() for q in self.model.parameters()]  # left by fit's last step
        image, p = analysis.imagine(self.model, 3, steps=100)
        self.assertEqual(tuple(image.shape), (28, 28))
        self.assertTrue(0 <= image.min().item() and image.max().item() <= 1)
        self.assertGreater(p, 0.9)
        self.assertTrue(self.model.training)  # mode given back
        for q, g in zip(self.model.parameters(), grads):  # the weights' gradients untouched
            self.assertTrue(torch.equal(q.grad, g))


class SideBySideTest(unittest.TestCase):
    def test_blocks_are_padded_and_top_aligned(self):
        self.assertEqual(plots_ascii.side_by_side(["ab\nc", "x\ny\nz"], gap=1),
                         "ab x\nc  y\n   z")
        self.assertEqual(plots_ascii.side_by_side([]), "")


if __name__ == "__main__":
    unittest.main()
