"""examples/cifar_commands/fit.py: the gate keep-ratio schedule, distillation and its teacher
ensemble (train and finetune end to end: tests/examples/test_cifar.py)."""
from __future__ import annotations

import argparse

import pytest
import torch

from ispc.examples.cifar_commands import fit


@pytest.mark.parametrize("target, anneal, expected", [
    (0.5, 0, [0.5, 0.5, 0.5]),
    (0.5, 4, [0.875, 0.75, 0.625, 0.5, 0.5]),
    (0.6, 1, [0.6, 0.6]),
])
def test_gate_keep_ratio_schedule(target: float, anneal: int, expected: list[float]) -> None:
    args = argparse.Namespace(gate_keep_ratio=target, gate_anneal_epochs=anneal)
    assert [fit.gate_keep_ratio(args, e) for e in range(len(expected))] == pytest.approx(expected)


def test_distillation_loss_is_the_temperature_scaled_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    temp = 3.0
    pt = torch.softmax(t / temp, 1)
    direct = (pt * (pt.log() - torch.log_softmax(s / temp, 1))).sum(1).mean() * temp ** 2
    assert fit.distillation_loss(s, t, temp).item() == pytest.approx(direct.item(), rel=1e-5)
    assert fit.distillation_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)
    assert fit.distillation_loss(s, t, temp).item() > 0.0


def test_teacher_ensemble_distils_the_mean_of_its_softened_predictions() -> None:
    torch.manual_seed(0)
    teachers = [torch.nn.Linear(6, 4) for _ in range(3)]
    x, temp = torch.randn(5, 6), 3.0
    ens = fit.TeacherEnsemble(teachers, temperature=temp)
    mean = torch.stack([torch.softmax(m(x) / temp, dim=1) for m in teachers]).mean(0)
    torch.testing.assert_close(torch.softmax(ens(x) / temp, dim=1), mean)
    student = torch.randn(5, 4)
    direct = torch.nn.functional.kl_div(torch.log_softmax(student / temp, 1), mean,
                                        reduction="batchmean") * temp * temp
    assert fit.distillation_loss(student, ens(x), temp).item() == pytest.approx(direct.item(), rel=1e-5)
    # one teacher: the ensemble is that teacher (same soft targets)
    one = fit.TeacherEnsemble(teachers[:1], temperature=temp)
    torch.testing.assert_close(torch.softmax(one(x) / temp, 1), torch.softmax(teachers[0](x) / temp, 1))
