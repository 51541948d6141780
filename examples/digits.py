"""Digit classification: cross-entropy MLP, best checkpoint by val loss, then a look inside.

    python examples/digits.py [--quick] [--epochs N] [--data MNIST_DIR [--fashion]] [--name RUN]

After training it prints what the tutorials draw with matplotlib and
TensorBoard: the confusion matrix, the most confident mistakes, a PCA of the
outputs and of the hidden layer, the first layer's weights, how confidence
moved from the first epoch to the last, and a digit the model imagines.
"""
import torch

from _common import parse_args, run_dir
import analysis
import datasets
import loops
import plots_ascii

FASHION = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Boot"]

args = parse_args(__doc__.splitlines()[0], epochs=10,
                  data_help="a folder with the MNIST or Fashion-MNIST IDX files",
                  extra=[("--fashion", dict(action="store_true",
                                            help="name the classes as Fashion-MNIST's"))])
epochs = args.epochs or (2 if args.quick else args.default_epochs)
if args.data:
    data = datasets.mnist(args.data)
    (X, y), test = data
    cut = len(X) - len(X) // 6  # 50,000 / 10,000 of MNIST's 60,000
    train, val = (X[:cut], y[:cut]), (X[cut:], y[cut:])
else:
    data = datasets.digits(n=3000 if args.quick else 12000)
    train, val, test = data
names = FASHION if args.fashion else [str(d) for d in range(10)]
print(f"data: {data.source}; {len(train[0])} train / {len(val[0])} val / {len(test[0])} test")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 250), torch.nn.ReLU(),
                            torch.nn.Linear(250, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
model.to(args.device)
loss_fn = torch.nn.CrossEntropyLoss()
run = run_dir(args, "digits")
tracker = analysis.ConfidenceTracker(model, val, device=args.device)  # first vs last epoch
history = loops.fit(model, train, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3),
                    epochs=epochs, val=val, batch_size=64, metrics={"acc": "accuracy"},
                    checkpoint=run, resume=args.resume, seed=0, device=args.device,
                    on_epoch_end=tracker)
print(plots_ascii.plot_history(history))

best = loops.load_checkpoint(f"{run}/best.pt", model)  # best val loss, not the last epoch
scores = loops.evaluate(model, test, loss_fn, metrics={"acc": "accuracy"})
print(f"best epoch {best['epoch']} (val_loss {best['value']:.4f}); "
      f"test accuracy {scores['acc']:.1%}, test loss {scores['loss']:.4f}")

X_test, y_test = test
p = analysis.predictions(model, X_test, device=args.device)
print()
print(analysis.confusion_view(p["labels"], y_test, 10, class_names=names))
print("\nthe mistakes it was surest of:\n")
print(analysis.mistakes_view(X_test, p["probs"], y_test, n=6, class_names=names))
print()
print(analysis.pca_view(p["outputs"], y_test, title="outputs"))
hidden = analysis.activations(model, model[4], X_test, device=args.device)
print()
print(analysis.pca_view(hidden, y_test, title="hidden layer (100 units)"))
print()
print(analysis.tsne_view(hidden, y_test, title="hidden layer (100 units)",
                         max_points=300 if args.quick else 1000))
print("\nfirst-layer weights, what 9 of its 250 units look for:\n")
print(analysis.weights_view(model[1]))
if tracker.first is not None:
    print("\nconfidence on the validation set, first epoch above the last:\n")
    print(tracker.view())
image, prob = analysis.imagine(model, 3, steps=60 if args.quick else 200, device=args.device)
print(f"\nnoise the model takes for a {names[3]} (p = {prob:.3f}):\n")
print(plots_ascii.image(image.tolist()))
