"""Binary classification of the Pima Indians diabetes table: BCE, accuracy, best checkpoint.

    python examples/pima.py [--quick] [--epochs N] [--data pima-indians-diabetes.csv]
"""
import torch

from _common import parse_args, run_dir
import datasets
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=50,
                  data_help="the Pima CSV: 9 numeric columns, outcome last, no header")
epochs = args.epochs or (5 if args.quick else args.default_epochs)
data = datasets.pima(args.data)
(train_all, test) = data
X, y = train_all
train, val = (X[:600], y[:600]), (X[600:], y[600:])  # best epoch chosen on val, never on test
print(f"data: {data.source}; {len(train[0])} train / {len(val[0])} val / {len(test[0])} test rows,"
      f" {y.mean().item():.0%} positive")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8),
                            torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
model.to(args.device)
loss_fn = torch.nn.BCELoss()
run = run_dir(args, "pima")
history = loops.fit(model, train, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3),
                    epochs=epochs, val=val, batch_size=10, metrics={"acc": "binary_accuracy"},
                    checkpoint=run, resume=args.resume, seed=0, device=args.device)

print(plots_ascii.plot_history(history))

best = loops.load_checkpoint(f"{run}/best.pt", model)
scores = loops.evaluate(model, test, loss_fn, metrics={"acc": "binary_accuracy"})
print(f"best epoch {best['epoch']} (val_loss {best['value']:.4f}); "
      f"test accuracy {scores['acc']:.1%}, test loss {scores['loss']:.4f}")
