"""A small GAN with its own training step: two networks, two Adam optimizers, one fit.

    python examples/gan.py [--quick] [--epochs N] [--device cuda] [--resume]

``loops.fit(train_step=...)`` runs your step (each optimizer's zero_grad, backward and
step) while loops keeps the rest: batching, seeding, the epoch's exact means of what
the step returns, checkpoints of both optimizers, an exact resume, progress, Ctrl-C.
``val_fn`` adds a value of your own each epoch, here the share of generated points
that land on one of the eight real clusters, and best.pt keeps the epoch where it peaked.
"""
import math

import torch

from _common import parse_args, rank, run_dir
import loops
import plots_ascii

args = parse_args(__doc__.splitlines()[0], epochs=40)
epochs = args.epochs or (4 if args.quick else args.default_epochs)
MODES, SPREAD = 8, 0.05  # eight Gaussians on a circle of radius 2


def ring(n, generator):
    """n points of the real data: a mixture of eight Gaussians around a circle."""
    k = torch.randint(0, MODES, (n,), generator=generator)
    angle = 2 * math.pi * k / MODES
    centres = 2 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return centres + SPREAD * torch.randn(n, 2, generator=generator)


g = torch.Generator().manual_seed(0)
real = ring(512 if args.quick else 4096, g)
print(f"data: {len(real)} points of {MODES} Gaussians on a ring (synthetic)")

torch.manual_seed(0)
model = torch.nn.ModuleDict({
    "G": torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                             torch.nn.ReLU(), torch.nn.Linear(64, 2)),
    "D": torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                             torch.nn.ReLU(), torch.nn.Linear(64, 1)),
}).to(args.device)
optimizers = {name: torch.optim.Adam(model[name].parameters(), lr=1e-3, betas=(0.5, 0.999))
              for name in ("G", "D")}
bce = torch.nn.BCEWithLogitsLoss()


def train_step(model, batch, optimizers):
    """One step of each: the discriminator on real and generated points, then the
    generator against it. Returns the batch's losses; loops averages them over the epoch."""
    x, _ = batch
    ones, zeros = torch.ones(len(x), 1, device=x.device), torch.zeros(len(x), 1, device=x.device)
    fake = model["G"](torch.randn(len(x), 2, device=x.device))  # seeded by fit's seed
    optimizers["D"].zero_grad()
    d_loss = bce(model["D"](x), ones) + bce(model["D"](fake.detach()), zeros)
    d_loss.backward()
    optimizers["D"].step()
    optimizers["G"].zero_grad()
    g_loss = bce(model["D"](fake), ones)
    g_loss.backward()
    optimizers["G"].step()
    return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


def generated(model, n=1000):
    """n generated points, from noise of its own generator: the same every time."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1)).to(args.device)
    with torch.no_grad():
        return model["G"](z).cpu()


def on_a_mode(points):
    """The share of points within 3 standard deviations of one of the real centres."""
    angle = 2 * math.pi * torch.arange(MODES) / MODES
    centres = 2 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (torch.cdist(points, centres).min(1).values < 3 * SPREAD).float().mean().item()


def val_fn(model):
    return {"on_mode": on_a_mode(generated(model))}


run = run_dir(args, "gan")
history = loops.fit(model, (real, torch.zeros(len(real))), None, optimizers, epochs=epochs,
                    batch_size=64, train_step=train_step, val_fn=val_fn, monitor="on_mode",
                    mode="max", checkpoint=run, resume=args.resume, seed=0, device=args.device)

if rank() == 0:
    print(plots_ascii.plot_history(history, monitor="on_mode"))
    loops.load_checkpoint(f"{run}/last.pt", model)
    fake = generated(model, 400)
    both = torch.cat([fake, real[:400]])  # the real ones drawn last, on top
    print(plots_ascii.scatter(both[:, 0], both[:, 1], labels=["o"] * 400 + ["#"] * 400,
                              width=60, height=22, title="generated (o) and real (#) points"))
    print(f"last epoch: {on_a_mode(fake):.0%} of the generated points land on a real "
          f"cluster; best epoch {int(history['best_epoch'][-1])} "
          f"({max(history['on_mode']):.0%})")
    print(f"run saved in {run}/ (best.pt, last.pt with both optimizers, history.csv)")
