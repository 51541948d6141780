"""What every example shares: its command-line flags and its run directory."""
import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the examples run from anywhere, beside loops.py


def parse_args(description, *, epochs, data_help=None, extra=()):
    """--epochs, --quick, --device, --resume, --runs, --name, and --data where a real file
    applies; ``extra`` adds (flag, argparse options) pairs of the recipe's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=None, help=f"epochs to train (default {epochs})")
    p.add_argument("--quick", action="store_true", help="a few seconds: small data, few epochs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--resume", action="store_true", help="continue the run in --runs/<name>")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="where runs are written")
    p.add_argument("--name", default=None, help="the run's directory under --runs "
                   "(default: the recipe's name); compare runs with plots_ascii.py")
    if data_help:
        p.add_argument("--data", default=None, help=data_help)
    for flag, options in extra:
        p.add_argument(flag, **options)
    args = p.parse_args()
    args.default_epochs = epochs
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run_dir(args, name):
    """runs/<name>: emptied for a fresh run (an example owns its directory), kept for --resume.
    Under torchrun only rank 0 empties it, and every rank waits until it has."""
    import torch
    path = os.path.join(args.runs, args.name or name)
    if not args.resume and os.path.isdir(path) and rank() == 0:
        shutil.rmtree(path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def rank():
    """This process's rank under torchrun, 0 otherwise: only rank 0 prints results."""
    import torch
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
