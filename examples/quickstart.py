"""Quick start: train a small classifier with loops.fit, keep the best checkpoint, test it.

    python examples/quickstart.py [--quick] [--epochs N] [--device cuda] [--resume]
"""
import torch

from _common import parse_args, run_dir
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=30)
epochs = args.epochs or (5 if args.quick else args.default_epochs)

# Two noisy interleaved spirals: not linearly separable, learned in seconds.
g = torch.Generator().manual_seed(0)
n = 1200
t = torch.rand(n, generator=g) * 3 * torch.pi
label = torch.randint(0, 2, (n,), generator=g)
r = t / (3 * torch.pi)
X = torch.stack([r * torch.cos(t + torch.pi * label), r * torch.sin(t + torch.pi * label)], 1)
X += 0.03 * torch.randn(n, 2, generator=g)
y = label.float().unsqueeze(1)
train, val, test = (X[:800], y[:800]), (X[800:1000], y[800:1000]), (X[1000:], y[1000:])
print(f"data: synthetic spirals, {len(train[0])} train / {len(val[0])} val / {len(test[0])} test")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 1), torch.nn.Sigmoid())
model.to(args.device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
loss_fn = torch.nn.BCELoss()
run = run_dir(args, "quickstart")

history = loops.fit(model, train, loss_fn, optimizer, epochs=epochs, val=val, batch_size=32,
                    metrics={"acc": "binary_accuracy"}, checkpoint=run, resume=args.resume,
                    seed=0, device=args.device)

print(plots_ascii.plot_history(history))

loops.load_checkpoint(f"{run}/best.pt", model)  # the best epoch's weights, not the last
scores = loops.evaluate(model, test, loss_fn, metrics={"acc": "binary_accuracy"})
best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
print(f"best epoch {best + 1}: val_loss {history['val_loss'][best]:.4f}")
print(f"test: loss {scores['loss']:.4f}  accuracy {scores['acc']:.1%}")
print(f"run saved in {run}/ (best.pt, last.pt, history.csv)")
