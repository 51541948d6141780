"""Pick a learning rate before training: the model's summary, the LR range test, its curve.

    python examples/find_lr.py [--quick] [--epochs N] [--data pima-indians-diabetes.csv]
"""
import torch

from _common import parse_args, run_dir
import analysis
import datasets
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=30,
                  data_help="the Pima CSV: 9 numeric columns, outcome last, no header")
epochs = args.epochs or (5 if args.quick else args.default_epochs)
data = datasets.pima(args.data)
(train_all, test) = data
X, y = train_all
train, val = (X[:600], y[:600]), (X[600:], y[600:])
print(f"data: {data.source}; {len(train[0])} train / {len(val[0])} val / {len(test[0])} test rows")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8),
                            torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(args.device)
loss_fn = torch.nn.BCEWithLogitsLoss()  # logits out; the binary metrics read them as such
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
print(analysis.summary(model, train[0][:10].to(args.device)))

found = loops.lr_find(model, train, loss_fn, optimizer, start_lr=1e-5, end_lr=10,
                      steps=60 if args.quick else 100, batch_size=10)
print()
print(plots_ascii.line_plot({"loss": found["loss"]}, x=found["lr"], logx=True,
                            marks=[found["suggestion"]], mark_label="suggested lr",
                            xlabel="learning rate", title="LR range test (smoothed loss)"))
lr = found["suggestion"]
print(f"suggested learning rate {lr:.3g} (tried {len(found['lr'])} rates up to "
      f"{found['lr'][-1]:.3g}); the model and optimizer are as they were")

for group in optimizer.param_groups:
    group["lr"] = lr
run = run_dir(args, "find_lr")
history = loops.fit(model, train, loss_fn, optimizer, epochs=epochs, val=val, batch_size=10,
                    metrics={"acc": "binary_accuracy"}, checkpoint=run, resume=args.resume,
                    seed=0, device=args.device)
print(plots_ascii.plot_history(history))
loops.load_checkpoint(f"{run}/best.pt", model)
scores = loops.evaluate(model, test, loss_fn, metrics={"acc": "binary_accuracy"})
print(f"test accuracy {scores['acc']:.1%} at lr {lr:.3g}")
