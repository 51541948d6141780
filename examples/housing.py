"""Regression of California house values: MSE loss, RMSE and MAE in the same unit ($100k).

    python examples/housing.py [--quick] [--epochs N] [--data housing.csv]
    torchrun --standalone --nproc_per_node=2 examples/housing.py   # the same fit on 2 processes
"""
import torch

from _common import parse_args, rank, run_dir
import datasets
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=20,
                  data_help="a numeric CSV: 8 feature columns, median house value last")
epochs = args.epochs or (2 if args.quick else args.default_epochs)
data = datasets.housing(args.data)
(train_all, test) = data
X, y = train_all
cut = int(0.9 * len(X))
train, val = (X[:cut], y[:cut]), (X[cut:], y[cut:])
if rank() == 0:
    print(f"data: {data.source}; {len(train[0])} train / {len(val[0])} val / {len(test[0])} "
          "test rows")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 12),
                            torch.nn.ReLU(), torch.nn.Linear(12, 6), torch.nn.ReLU(),
                            torch.nn.Linear(6, 1))
model, device = loops.setup_distributed(model.to(args.device))  # DDP under torchrun, else as is
loss_fn = torch.nn.MSELoss()
metrics = {"rmse": "rmse", "mae": "mae"}  # both in the target's unit, unlike the MSE
run = run_dir(args, "housing")
history = loops.fit(model, train, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3),
                    epochs=epochs, val=val, batch_size=32, metrics=metrics,
                    checkpoint=run, resume=args.resume, seed=0, device=device)
loops.load_checkpoint(f"{run}/best.pt", model)  # every rank: all go on to the end together
scores = loops.evaluate(model, test, loss_fn, metrics=metrics)
if rank() == 0:  # every rank holds the same history and scores; one prints them
    print(plots_ascii.plot_history(history))
    print(f"test: RMSE {scores['rmse']:.4f} (${scores['rmse'] * 1e5:,.0f}), "
          f"MAE {scores['mae']:.4f} (${scores['mae'] * 1e5:,.0f}), MSE {scores['loss']:.4f}")
