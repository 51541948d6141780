"""Linear regression with nn.Parameter weights and L1 loss (the PyTorch workflow tutorial).

    python examples/linear.py [--quick] [--epochs N] [--device cuda] [--resume]
"""
import torch

from _common import parse_args, run_dir
import datasets
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=300)
epochs = args.epochs or (100 if args.quick else args.default_epochs)  # one batch an epoch
data = datasets.linear(weight=0.7, bias=0.3)
(train, test) = data
print(f"data: {data.source}; {len(train[0])} train / {len(test[0])} test points")


class LinearRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(1))
        self.bias = torch.nn.Parameter(torch.randn(1))

    def forward(self, x):
        return self.weight * x + self.bias


torch.manual_seed(42)
model = LinearRegression().to(args.device)
print(f"before training: weight {model.weight.item():.4f}, bias {model.bias.item():.4f}")


def every_50(epoch, logs):  # the tutorial prints every few epochs, not all 300
    if epoch % 50 == 0 or epoch == epochs:
        print(f"epoch {epoch:3d}  train L1 {logs['loss']:.4f}  test L1 {logs['val_loss']:.4f}")


history = loops.fit(model, train, torch.nn.L1Loss(), torch.optim.SGD(model.parameters(), lr=0.01),
                    epochs=epochs, val=test, batch_size=len(train[0]), shuffle=False,
                    checkpoint=run_dir(args, "linear"), resume=args.resume,
                    device=args.device, verbose=0, on_epoch_end=every_50)

print(plots_ascii.plot_history(history))

w, b = model.weight.item(), model.bias.item()
print(f"learned weight {w:.4f} (true 0.7), bias {b:.4f} (true 0.3)")
print(f"test L1 {history['val_loss'][-1]:.4f} after {len(history['loss'])} epochs")
