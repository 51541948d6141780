"""What every example shares: its command-line flags, its run directory and how it ends
when interrupted."""
import argparse
import os
import re
import signal
import sys

_current = {"run": None}  # the run directory chosen, for the message on Ctrl-C
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the examples run from anywhere, beside loops.py


def parse_args(description, *, epochs, data_help=None, extra=()):
    """--epochs, --quick, --device, --resume, --runs, --name, --threads, and --data where a
    real file applies; ``extra`` adds (flag, argparse options) pairs of the recipe's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=None, help=f"epochs to train (default {epochs})")
    p.add_argument("--quick", action="store_true", help="a few seconds: small data, few epochs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest run of this recipe (or the run --name names)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="where runs are written")
    p.add_argument("--name", default=None, help="the run's directory under --runs (default: "
                   "the recipe's name, numbered -2, -3 ... so that no run is overwritten)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the examples' models are small, and a "
                        "second thread costs more than it gives; see README)")
    if data_help:
        p.add_argument("--data", default=None, help=data_help)
    for flag, options in extra:
        p.add_argument(flag, **options)
    args = p.parse_args()
    args.default_epochs = epochs
    import torch
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU "
                "(torch.cuda.is_available() is False); use --device cpu")
    sys.excepthook = _interrupted_quietly
    return args


def run_dir(args, name):
    """The run's directory under --runs. Nothing is ever deleted: a fresh run takes
    <name>, or <name>-2, <name>-3 ... when that holds a run; --resume continues the
    newest of them; --name picks one directory exactly (fit refuses to start over
    a run there without --resume). Under torchrun every rank picks before any writes."""
    import torch
    if args.name:
        path = os.path.join(args.runs, args.name)
        if not args.resume and os.path.exists(os.path.join(path, "last.pt")):
            raise SystemExit(f"{path} already holds a run: continue it with --resume, or "
                             "start another with a new --name")
    else:
        taken = _numbered_runs(args.runs, name)
        if args.resume and taken:
            path = taken[-1][1]
        else:
            k = taken[-1][0] + 1 if taken else 1
            path = os.path.join(args.runs, name if k == 1 else f"{name}-{k}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has chosen; now rank 0 may create it
    _current["run"] = path
    return path


def _numbered_runs(runs, name):
    """[(k, path)] of runs/<name> (k = 1) and runs/<name>-k that hold a run, by k."""
    found = []
    if os.path.isdir(runs):
        for entry in os.listdir(runs):
            m = re.fullmatch(re.escape(name) + r"(?:-(\d+))?", entry)
            path = os.path.join(runs, entry)
            if m and os.path.exists(os.path.join(path, "last.pt")):
                found.append((int(m.group(1) or 1), path))
    return sorted(found)


def _interrupted_quietly(kind, value, tb):
    """Ctrl-C: fit has said what is saved; say how to go on, with no traceback, and end
    as an interrupted program does (by SIGINT, exit status 130 in a shell)."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, tb)
    run = _current["run"]
    if run and os.path.exists(os.path.join(run, "last.pt")):
        again = [a for a in sys.argv if a != "--resume"] + ["--resume"]
        if not any(a == "--name" or a.startswith("--name=") for a in sys.argv):
            again += ["--name", os.path.basename(run)]
        print(f"stopped; {run} keeps the last completed epoch; continue with: "
              f"python {' '.join(again)}", file=sys.stderr)
    else:
        print("stopped; nothing was saved", file=sys.stderr)
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def rank():
    """This process's rank under torchrun, 0 otherwise: only rank 0 prints results."""
    import torch
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
