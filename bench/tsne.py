"""t-SNE benchmark: analysis.tsne_2d against scikit-learn's TSNE, one core, same points.

    python bench/tsne.py [--seeds 3] [--big 20000]

On scikit-learn's 1,797 8x8 digits (bundled with it, no download) it prints, for each
seed, the CPU time of ``analysis.tsne_2d`` (defaults: perplexity 30, 500 steps) and of
``sklearn.manifold.TSNE(n_jobs=1)`` (Barnes-Hut, its defaults: 1,000 steps), each
map's trustworthiness (5 neighbours) and KL divergence; then the time of 1,000 points
(what examples/digits.py draws) and the peak memory added by ``--big`` random points
(2 steps), measured in a fresh process. Without scikit-learn it times ours alone on
datasets.digits. One thread everywhere (torch.set_num_threads(1), OMP_NUM_THREADS=1).
"""
import argparse
import os
import subprocess
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import analysis  # noqa: E402
import datasets  # noqa: E402

torch.set_num_threads(1)


def cpu_seconds(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        (X, _), _ = datasets.digits(n=2000, seed=0)
        return X.reshape(len(X), -1)[:1797].double().numpy(), None
    X, _ = load_digits(return_X_y=True)
    return X, __import__("sklearn.manifold", fromlist=["TSNE"])


def peak_mb(n):
    code = ("import resource, torch, analysis\n"
            f"X = torch.randn({n}, 10, generator=torch.Generator().manual_seed(0))\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "analysis.tsne_2d(X, steps=2)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    return int(out.stdout) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--big", type=int, default=20000)
    args = p.parse_args()
    X, manifold = digits()
    print(f"{len(X)} digits, {X.shape[1]} features, one thread")
    for seed in range(args.seeds):
        t, (coords, kl) = cpu_seconds(lambda: analysis.tsne_2d(torch.tensor(X), seed=seed))
        line = f"seed {seed}: tsne_2d {t:5.2f} s  KL {kl[-1]:.4f}"
        if manifold is not None:
            trust = manifold.trustworthiness(X, coords.numpy(), n_neighbors=5)
            t_sk, sk = cpu_seconds(lambda: manifold.TSNE(random_state=seed, n_jobs=1).fit(X))
            trust_sk = manifold.trustworthiness(X, sk.embedding_, n_neighbors=5)
            line += (f"  trustworthiness {trust:.4f}   scikit-learn {t_sk:5.2f} s  KL "
                     f"{sk.kl_divergence_:.4f}  trustworthiness {trust_sk:.4f}")
        print(line, flush=True)
    t, _ = cpu_seconds(lambda: analysis.tsne_2d(torch.tensor(X[:1000])))
    print(f"1,000 points: {t:.2f} s")
    print(f"{args.big:,} points, 2 steps: peak memory +{peak_mb(args.big):.0f} MB")


if __name__ == "__main__":
    main()
