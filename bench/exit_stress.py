"""Does a finished torchrun job exit 0 on every rank? Launches test_distributed's 3-rank
sharded job and its 2-rank DDP kill-and-resume chain N times each, and counts the
launches that ended non-zero or with a rank aborted at exit ("terminate called").

    python bench/exit_stress.py [N]        (default 30: about 15 minutes on 2 cores)
"""
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import test_distributed as td  # noqa: E402


def main(n):
    d = tempfile.mkdtemp()
    td.CHILD_PATH = os.path.join(d, "child.py")
    with open(td.CHILD_PATH, "w") as f:
        f.write(td.CHILD)
    bad = {"3-rank sharded job": 0, "2-rank DDP kill-and-resume chain": 0}
    t0 = time.time()
    for i in range(n):
        w = tempfile.mkdtemp()
        os.mkdir(os.path.join(w, "out"))
        rc, _, err = td.torchrun("shard-resume-sharded", os.path.join(w, "out"),
                                 os.path.join(w, "run"), 2, 8, ranks=3)
        if rc or "terminate called" in err:
            bad["3-rank sharded job"] += 1
            print(f"launch {i}: sharded job ended {rc}:\n{err[-2000:]}", flush=True)
        w = tempfile.mkdtemp()
        os.mkdir(os.path.join(w, "out"))
        args = ("resume", os.path.join(w, "out"), os.path.join(w, "run"), 3, 8)
        _, _, killed = td.torchrun(*args, env={"SIGNAL": "0:10:KILL"})
        rc, _, err = td.torchrun(*args)
        if rc or "terminate called" in killed + err:
            bad["2-rank DDP kill-and-resume chain"] += 1
            print(f"launch {i}: DDP chain ended {rc}:\n{err[-2000:]}", flush=True)
    for name, count in bad.items():
        print(f"{name}: {n} launches, {count} ended badly")
    print(f"{time.time() - t0:.0f} s")
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
