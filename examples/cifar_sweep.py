"""Run several ``cifar.py`` training runs at once, as long as a wall-clock budget allows.

ResNet-20 on CIFAR-10 leaves a large GPU mostly idle (each step is a few hundred small kernels), so
a lambda sweep runs best as concurrent processes. How many epochs fit depends on the device and
on how many runs share it, so this measures first: every run trains ``--probe-batches`` steps
concurrently, and the steady step rate, evaluation time and process start-up give each run's
epoch time under that load. All runs then get the same number of epochs (comparable cosine
schedules), the most that fits the slowest run in ``--budget`` seconds.

    python examples/cifar_sweep.py --budget 420 --out runs/sweep \\
        --common "--data ../shared/data/cifar10-jpeg.tar.gz --device cuda --no-progress" \\
        --run "dense=train --model resnet20" \\
        --run "fd6=train --model resnet20 --feature-decay 6e-4"

Each run's output goes to ``OUT/NAME.out`` and its checkpoints to ``OUT/NAME/``; the summary
(table, and ``OUT/summary.json``) gives epochs, final and best top-1 and seconds per run. A run
still going at ``--budget`` plus ``--grace`` seconds is stopped; its ``last.pt`` holds its last
finished epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().with_name("cifar.py")

__all__ = ["Probe", "epochs_within", "main", "parse_run"]


@dataclass(frozen=True)
class Probe:
    """What one probe run measured under the concurrent load: seconds per training step (steady
    state), seconds to evaluate the test set once, seconds from launch to the first step."""

    seconds_per_step: float
    eval_seconds: float
    startup_seconds: float


def epochs_within(budget: float, probes: list[Probe], steps_per_epoch: int, *,
                  margin: float = 0.1, max_epochs: int | None = None) -> int:
    """The most epochs every run finishes in ``budget`` seconds, with ``margin`` of each epoch's
    estimate held back (load varies; the last checkpoint write takes time too)."""
    if budget <= 0 or steps_per_epoch < 1 or not probes:
        raise ValueError("need a positive budget, at least one step per epoch and one probe")
    fits = []
    for p in probes:
        epoch = (p.seconds_per_step * steps_per_epoch + p.eval_seconds) * (1.0 + margin)
        fits.append(math.floor((budget - p.startup_seconds) / epoch))
    worst = min(fits)
    if max_epochs is not None:
        worst = min(worst, max_epochs)
    return max(worst, 0)


def parse_run(text: str) -> tuple[str, list[str]]:
    """``NAME=ARGS`` -> (name, argument list). Names become folder names."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise argparse.ArgumentTypeError(f"--run takes NAME=ARGS with NAME of letters, digits, "
                                         f"'-', '_' or '.', got {text!r}")
    args = shlex.split(rest)
    if not args or args[0] not in ("train", "finetune"):
        raise argparse.ArgumentTypeError(f"run {name!r}: ARGS must start with train or finetune")
    if any(a in ("--epochs", "--out", "--max-batches", "--resume") for a in args):
        raise argparse.ArgumentTypeError(f"run {name!r}: the sweep sets --epochs, --out and "
                                         "--max-batches itself")
    return name, args


def _launch(args: list[str], out_file: Path) -> subprocess.Popen:
    with open(out_file, "w") as fh:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen([sys.executable, "-u", str(SCRIPT), *args], stdout=fh,
                                stderr=subprocess.STDOUT)


def _records(folder: Path) -> list[dict]:
    log = folder / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]


def _wait(procs: dict[str, subprocess.Popen], deadline: float,
          ended: dict[str, float] | None = None) -> dict[str, int | None]:
    """Exit codes (None: stopped at ``deadline``); ``ended`` receives each run's end time."""
    codes: dict[str, int | None] = {}
    ended = {} if ended is None else ended
    while len(codes) < len(procs):
        for name, proc in procs.items():
            if name not in codes and proc.poll() is not None:
                codes[name] = proc.returncode
                ended[name] = time.monotonic()
        if time.monotonic() > deadline:
            for name, proc in procs.items():
                if name not in codes:
                    proc.terminate()
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    codes[name] = None  # stopped at the deadline
            break
        time.sleep(0.5)
    return codes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cifar_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", dest="runs", action="append", type=parse_run, required=True,
                   metavar="NAME=ARGS", help="one training run: a name and cifar.py arguments")
    p.add_argument("--common", default="", help="arguments every run gets (--data, --device, ...)")
    p.add_argument("--out", required=True, help="folder for every run's output")
    p.add_argument("--budget", type=float, required=True,
                   help="seconds the training runs may take, probe not included")
    p.add_argument("--probe-batches", type=int, default=120,
                   help="steps each run trains to measure its rate (> 50: the first 50 are warm-up)")
    p.add_argument("--probe-timeout", type=float, default=180.0,
                   help="seconds the probe may take before the sweep gives up")
    p.add_argument("--max-epochs", type=int, default=None, help="never more epochs than this")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds past the budget before an unfinished run is stopped")
    args = p.parse_args(argv)
    names = [n for n, _ in args.runs]
    if len(set(names)) != len(names):
        p.error(f"run names must differ, got {names}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = shlex.split(args.common)

    # 1. probe: every run at once, one short epoch each
    t0 = time.monotonic()
    procs = {n: _launch([*a, *common, "--epochs", "1", "--max-batches", str(args.probe_batches),
                         "--out", str(out / "probe" / n)], out / f"{n}.probe.out")
             for n, a in args.runs}
    ended: dict[str, float] = {}
    codes = _wait(procs, t0 + args.probe_timeout, ended)
    probes, steps = [], 0
    for name, _ in args.runs:
        recs = _records(out / "probe" / name)
        if codes[name] != 0 or not recs:
            print(f"probe of {name!r} failed (exit {codes[name]}); see {out / (name + '.probe.out')}",
                  file=sys.stderr)
            return 1
        r = recs[0]
        # steady-state rate where the probe was long enough to measure one; else warm-up included
        per_step = r.get("seconds_per_step", r["train_seconds"] / max(r["steps"], 1))
        startup = ended[name] - t0 - r["seconds"]  # launch to first step, and the exit after
        probes.append(Probe(per_step, r["seconds"] - r["train_seconds"], max(0.0, startup)))
        steps = max(steps, r["epoch_steps"])
    epochs = epochs_within(args.budget, probes, steps, max_epochs=args.max_epochs)
    for (name, _), pr in zip(args.runs, probes):
        print(f"probe {name}: {1e3 * pr.seconds_per_step:.2f} ms/step, eval {pr.eval_seconds:.1f} s, "
              f"start-up {pr.startup_seconds:.1f} s", flush=True)
    print(f"{len(args.runs)} runs at once: {epochs} epochs each fit {args.budget:.0f} s", flush=True)
    if epochs < 1:
        print("not one epoch fits the budget", file=sys.stderr)
        return 1

    # 2. the runs themselves
    t1 = time.monotonic()
    procs = {n: _launch([*a, *common, "--epochs", str(epochs), "--out", str(out / n)], out / f"{n}.out")
             for n, a in args.runs}
    codes = _wait(procs, t1 + args.budget + args.grace)
    summary = []
    for name, _ in args.runs:
        recs = _records(out / name)
        summary.append({"name": name, "epochs": epochs, "exit": codes[name],
                        "finished_epochs": len(recs),
                        "final_top1": recs[-1]["test_acc"] if recs else None,
                        "best_top1": max((r["test_acc"] for r in recs), default=None),
                        "seconds": round(sum(r["seconds"] for r in recs), 1)})
    (out / "summary.json").write_text(json.dumps({"budget": args.budget, "epochs": epochs,
                                                  "wall_seconds": round(time.monotonic() - t1, 1),
                                                  "runs": summary}, indent=2) + "\n")
    for s in summary:
        top = "-" if s["final_top1"] is None else f"{100 * s['final_top1']:.2f}%"
        print(f"{s['name']}: {s['finished_epochs']}/{epochs} epochs, exit {s['exit']}, final top-1 "
              f"{top}, {s['seconds']} s", flush=True)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
