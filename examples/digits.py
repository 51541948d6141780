"""Digit classification: cross-entropy MLP, best checkpoint by val loss reloaded for the test.

    python examples/digits.py [--quick] [--epochs N] [--data MNIST_DIR]
"""
import torch

from _common import parse_args, run_dir
import datasets
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=10,
                  data_help="a folder with the MNIST or Fashion-MNIST IDX files")
epochs = args.epochs or (2 if args.quick else args.default_epochs)
if args.data:
    data = datasets.mnist(args.data)
    (X, y), test = data
    cut = len(X) - len(X) // 6  # 50,000 / 10,000 of MNIST's 60,000
    train, val = (X[:cut], y[:cut]), (X[cut:], y[cut:])
else:
    data = datasets.digits(n=3000 if args.quick else 12000)
    train, val, test = data
print(f"data: {data.source}; {len(train[0])} train / {len(val[0])} val / {len(test[0])} test")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 250), torch.nn.ReLU(),
                            torch.nn.Linear(250, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
model.to(args.device)
loss_fn = torch.nn.CrossEntropyLoss()
run = run_dir(args, "digits")
history = loops.fit(model, train, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3),
                    epochs=epochs, val=val, batch_size=64, metrics={"acc": "accuracy"},
                    checkpoint=run, resume=args.resume, seed=0, device=args.device)

print(plots_ascii.plot_history(history))

best = loops.load_checkpoint(f"{run}/best.pt", model)  # best val loss, not the last epoch
scores = loops.evaluate(model, test, loss_fn, metrics={"acc": "accuracy"})
print(f"best epoch {best['epoch']} (val_loss {best['value']:.4f}); "
      f"test accuracy {scores['acc']:.1%}, test loss {scores['loss']:.4f}")
