"""examples/cifar.py end to end (train, resume, finetune, average, evaluate) on a tiny fake CIFAR
folder with a tiny model; the commands' parts: tests/examples/cifar_commands/."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar_common import HERE, REPO, SCRIPT, load_script, make_fake_cifar  # noqa: E402

KEYS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}


@pytest.fixture(scope="module")
def cifar():
    yield from load_script("ispc_cifar_script")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """16 train and 4 test images per class."""
    return make_fake_cifar(tmp_path_factory.mktemp("ispc_cifar_script"), train=16, test=4,
                           spread=40, step=20)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _args(fake: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    # on the CPU, where runs are bit-for-bit reproducible (CUDA's kernels are not)
    return ["train", "--model", "_cifar_tiny:tiny", "--device", "cpu", "--data", str(fake), "--out", str(out),
            "--cache-dir", str(cache), "--batch-size", "32", "--threads", "1", "--no-progress",
            "--epochs", "2", *extra]


def test_train_resume_finetune_evaluate(cifar, fake: Path, tmp_path: Path, capsys) -> None:
    cache, a, b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"

    # 1. epoch 1 of 2 in a subprocess, exactly as a user runs the file
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), *_args(fake, a, cache, "--stop-after", "1")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = _log(a)
    assert len(log) == 1 and KEYS <= set(log[0]) and log[0]["epoch"] == 1
    assert log[0]["lr"] == pytest.approx(0.1)
    last = torch.load(a / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng", "args"} <= set(last)
    assert last["args"]["model"] == "_cifar_tiny:tiny" and last["args"]["epochs"] == 2
    assert (a / "best.pt").exists() and not (a / "final.pt").exists()

    # 2. resume: only --out/--resume needed; the run's own settings come from last.pt
    assert cifar.main(["train", "--out", str(a), "--resume", "--cache-dir", str(cache),
                       "--no-progress", "--threads", "1"]) == 0
    log = _log(a)
    assert [r["epoch"] for r in log] == [1, 2]
    assert 0 < log[1]["lr"] < log[0]["lr"]  # cosine schedule continued, not restarted
    final = torch.load(a / "final.pt", weights_only=True)
    assert final["model_name"] == "_cifar_tiny:tiny" and final["epoch"] == 2
    assert final["top1"] == log[1]["test_acc"] and "command" in final

    # 3. ... and is exactly the run that was never interrupted
    assert cifar.main(_args(fake, b, cache)) == 0
    assert [r["train_loss"] for r in _log(b)] == [r["train_loss"] for r in log]
    ref = torch.load(b / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(ref[k], v) for k, v in final["model"].items())

    # 4. mistakes are reported, not acted on
    assert cifar.main(_args(fake, b, cache)) == 2  # the folder already holds a run
    assert cifar.main([*_args(fake, b, cache, "--resume", "--lr", "0.5")]) == 2
    assert "was started with other settings" in capsys.readouterr().err

    # 5. fine-tune with feature decay logs the regularizer
    ft = tmp_path / "ft"
    assert cifar.main(["finetune", "--checkpoint", str(a / "final.pt"), "--feature-decay", "1e-3",
                       "--data", str(fake), "--out", str(ft), "--cache-dir", str(cache), "--epochs", "1",
                       "--batch-size", "32", "--no-progress", "--threads", "1"]) == 0
    (rec,) = _log(ft)
    assert rec["feature_decay"] > 0 and rec["lr"] == pytest.approx(0.01)
    assert torch.load(ft / "final.pt", weights_only=True)["feature_decay"] == 1e-3

    # 5b. ... and with the dense parent as a distillation teacher, logging its term
    kd = tmp_path / "kd"
    kd_args = ["finetune", "--checkpoint", str(a / "final.pt"), "--feature-decay", "1e-3", "--distill-from",
               str(a / "final.pt"), "--data", str(fake), "--cache-dir", str(cache), "--epochs", "1",
               "--batch-size", "32", "--no-progress", "--threads", "1"]
    assert cifar.main([*kd_args, "--out", str(kd)]) == 0
    (rec,) = _log(kd)
    assert rec["distill_loss"] > 0 and math.isfinite(rec["distill_loss"]) and rec["feature_decay"] > 0
    saved = torch.load(kd / "last.pt", weights_only=True)["args"]
    assert (saved["distill_from"], saved["distill_weight"], saved["distill_temperature"]) == (
        [str(a / "final.pt")], 0.9, 4.0)
    # the distillation term is in the loss beside feature decay: the same run without a teacher differs
    assert cifar.main([*kd_args[:5], *kd_args[7:], "--out", str(tmp_path / "fd_only")]) == 0
    w_kd = torch.load(kd / "final.pt", weights_only=True)["model"]
    w_fd = torch.load(tmp_path / "fd_only" / "final.pt", weights_only=True)["model"]
    assert any(not torch.equal(w_kd[k], w_fd[k]) for k in w_kd)
    # a run saved when --distill-from took one path (a string) still resumes, with that teacher
    last = torch.load(kd / "last.pt", weights_only=True)
    last["args"]["distill_from"] = str(a / "final.pt")
    torch.save(last, kd / "last.pt")
    assert cifar.main(["finetune", "--out", str(kd), "--resume", "--cache-dir", str(cache),
                       "--no-progress", "--threads", "1"]) == 0
    # two teachers: an ensemble, which differs from one of them alone
    ens_args = [*kd_args[:7], str(b / "final.pt"), *kd_args[7:]]
    assert cifar.main([*ens_args, "--out", str(tmp_path / "ens")]) == 0
    assert torch.load(tmp_path / "ens" / "last.pt", weights_only=True)["args"]["distill_from"] == [
        str(a / "final.pt"), str(b / "final.pt")]
    w_ens = torch.load(tmp_path / "ens" / "final.pt", weights_only=True)["model"]
    assert any(not torch.equal(w_kd[k], w_ens[k]) for k in w_kd)
    capsys.readouterr()
    assert cifar.main([*kd_args, "--out", str(tmp_path / "kd2"), "--distill-weight", "1.5"]) == 2
    assert "--distill-weight must be in [0, 1]" in capsys.readouterr().err

    # 5c. training from scratch takes the same regularizers: feature decay and a teacher, logged
    sc = tmp_path / "scratch"
    assert cifar.main([*_args(fake, sc, cache, "--epochs", "1", "--feature-decay", "1e-3",
                              "--distill-from", str(a / "final.pt"), "--distill-weight", "0.5")]) == 0
    (rec,) = _log(sc)
    assert rec["feature_decay"] > 0 and rec["distill_loss"] > 0 and rec["lr"] == pytest.approx(0.1)
    saved = torch.load(sc / "final.pt", weights_only=True)
    assert saved["feature_decay"] == 1e-3 and saved["parent"] is None
    assert saved["args"]["distill_weight"] == 0.5

    # 5c'. ... with the regularizer's weight ramped up from 0 over the first 2 epochs (per step)
    rp = tmp_path / "ramp"
    assert cifar.main([*_args(fake, rp, cache, "--feature-decay", "1e-3", "--feature-decay-ramp", "2")]) == 0
    assert [r["feature_decay_weight"] for r in _log(rp)] == pytest.approx([5e-4, 1e-3])
    assert cifar.main([*_args(fake, tmp_path / "bad", cache, "--feature-decay", "1e-3",
                              "--feature-decay-ramp", "-1")]) == 2
    assert cifar.main([*_args(fake, tmp_path / "bad", cache, "--feature-decay-ramp", "2")]) == 2

    # 5d. a diverging run stops with a clear error (the running loss is read every few steps)
    capsys.readouterr()
    assert cifar.main(_args(fake, tmp_path / "diverge", cache, "--epochs", "1", "--lr", "1e30")) == 2
    assert "training diverged in epoch 1" in capsys.readouterr().err
    # ... and so does one whose feature decay zeroed every regularized feature map
    assert cifar.main(_args(fake, tmp_path / "dead", cache, "--feature-decay", "1e3")) == 2
    assert "drove every regularized feature map to zero" in capsys.readouterr().err

    # 6. gate-aware fine-tuning: the epoch's gates are in the forward pass, and their accuracy logged;
    #    annealed over 2 epochs the keep ratio goes 0.75, then 0.5
    gt = tmp_path / "gt"
    assert cifar.main(["finetune", "--checkpoint", str(a / "final.pt"), "--feature-decay", "0",
                       "--gate-keep-ratio", "0.5", "--gate-anneal-epochs", "2", "--gate-calibration-size",
                       "64", "--data", str(fake), "--out", str(gt), "--cache-dir", str(cache), "--epochs",
                       "2", "--batch-size", "32", "--no-progress", "--threads", "1"]) == 0
    recs = _log(gt)
    assert all(0.0 <= r["test_acc_gated"] <= 1.0 and "test_acc" in r for r in recs)
    assert [r["gate_keep_ratio"] for r in recs] == pytest.approx([0.75, 0.5])
    saved = torch.load(gt / "last.pt", weights_only=True)["args"]
    assert (saved["gate_keep_ratio"], saved["gate_mode"], saved["gate_allocation"],
            saved["gate_anneal_epochs"]) == (0.5, "threshold", "global", 2)

    # 7. evaluate prints the checkpoint's top-1
    capsys.readouterr()
    assert cifar.main(["evaluate", "--checkpoint", str(a / "final.pt"), "--data", str(fake),
                       "--cache-dir", str(cache), "--no-progress"]) == 0
    assert f"{100 * final['top1']:.2f}%" in capsys.readouterr().out


def test_average_is_the_mean_of_the_weights_with_batchnorm_re_estimated(cifar, fake: Path,
                                                                         tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        assert cifar.main([*_args(fake, out, cache, "--seed", str(seed))]) == 0
        runs.append(out / "final.pt")
    states = [torch.load(p, weights_only=True)["model"] for p in runs]
    common = ["--data", str(fake), "--cache-dir", str(cache), "--no-progress", "--threads", "1",
              "--batch-size", "32"]

    # without BatchNorm re-estimation: exactly the mean of every float entry
    plain = tmp_path / "plain.pt"
    assert cifar.main(["average", *map(str, runs), "--out", str(plain), "--bn-images", "0", *common]) == 0
    avg = torch.load(plain, weights_only=True)
    for k, v in avg["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2)
        else:
            assert torch.equal(v, states[0][k])
    assert avg["parents"] == list(map(str, runs)) and "average" in avg["command"]
    assert avg["bn_images"] == 0 and "BatchNorm statistics averaged" in capsys.readouterr().out

    # with it: each BatchNorm's mean is the mean of its input over those (augmented) training
    # images, one equal weight per batch, computed here directly
    bn = tmp_path / "bn.pt"
    assert cifar.main(["average", *map(str, runs), "--out", str(bn), "--bn-images", "64", *common]) == 0
    soup = torch.load(bn, weights_only=True)
    assert soup["bn_images"] == 64
    model, _ = cifar.load_checkpoint(plain)
    from ispc.datasets import CIFAR10
    from ispc.examples.cifar_commands.common import first_images

    data = CIFAR10(str(fake), cache_dir=str(cache), progress=False)
    loader = data.loader("train", batch_size=32, train=True, shuffle=True, seed=0)
    torch.manual_seed(0)
    means = [model[0](x).mean(dim=(0, 2, 3)) for x, _ in first_images(loader, 64)]
    assert len(means) == 2
    torch.testing.assert_close(soup["model"]["1.running_mean"], torch.stack(means).mean(0))
    assert not torch.allclose(soup["model"]["1.running_mean"], avg["model"]["1.running_mean"])
    for k in ("0.weight", "4.weight", "8.bias"):  # the weights themselves are the plain mean
        torch.testing.assert_close(soup["model"][k], avg["model"][k])
    # the reported top-1 is the saved model's
    model, _ = cifar.load_checkpoint(bn)
    test = data.loader("test", batch_size=32)
    assert soup["top1"] == pytest.approx(cifar.evaluate_top1(model.eval(), test))
    assert f"{100 * soup['top1']:.2f}%" in capsys.readouterr().out

    # checkpoints of different models are refused with the reason
    other = {**torch.load(runs[1], weights_only=True)}
    other["model"] = {k: (v[:8] if k == "0.weight" else v) for k, v in other["model"].items()}
    torch.save(other, tmp_path / "other.pt")
    assert cifar.main(["average", str(runs[0]), str(tmp_path / "other.pt"), "--out",
                       str(tmp_path / "x.pt"), *common]) == 2
    assert "average only checkpoints of one model" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
