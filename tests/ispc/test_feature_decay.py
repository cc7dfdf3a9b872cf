"""Tests of the feature-decay regularizer on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ispc.errors import ConfigError
from ispc.feature_decay import FeatureDecay, default_sites, feature_decay_term


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(self.body(self.stem(x))))


def _direct(model: Tiny, x: torch.Tensor, weight: float) -> torch.Tensor:
    """The regularizer written out by hand for the default sites (body.1 and head)."""
    a = torch.relu(model.stem(x))
    b = model.dw(torch.relu(model.body[1](a)))
    total = 0.0
    for f in (a, b):
        total = total + f.pow(2).sum(dim=(2, 3)).sqrt().sum(dim=1).mean()
    return weight * total


def test_default_sites_skip_stem_and_depthwise() -> None:
    assert default_sites(Tiny()) == ["body.1", "head"]


def test_value_matches_direct_computation() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(4, 3, 8, 8)
    decay = FeatureDecay(model, 0.25)
    assert decay.value().item() == 0.0  # nothing recorded yet
    model(x)
    torch.testing.assert_close(decay.value(), _direct(model, x, 0.25))
    # a new forward replaces the record rather than adding to it
    model(x[:2])
    torch.testing.assert_close(decay.value(), _direct(model, x[:2], 0.25))


def test_named_layers_and_gradients() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(2, 3, 6, 6)
    decay = FeatureDecay(model, 1.0, layers=["module.dw"])  # DDP-style prefix is accepted
    assert decay.layers == ["dw"]
    model(x)
    ref = feature_decay_term(torch.relu(model.body[1](torch.relu(model.stem(x)))))
    torch.testing.assert_close(decay.value(), ref)
    decay.value().backward()
    assert model.stem.weight.grad is not None and model.head.weight.grad is None


def test_zero_channel_gradient_is_finite() -> None:
    x = torch.zeros(2, 4, 3, 3, requires_grad=True)
    feature_decay_term(x).backward()
    assert torch.isfinite(x.grad).all()


def test_records_only_in_training_with_grad() -> None:
    model, x = Tiny(), torch.randn(2, 3, 6, 6)
    decay = FeatureDecay(model, 1.0)
    with torch.no_grad():
        model(x)
    assert decay.value().item() == 0.0
    model.eval()
    model(x)
    assert decay.value().item() == 0.0
    always = FeatureDecay(model, 1.0, always=True)
    with torch.no_grad():
        model(x)
    assert always.value().item() > 0


def test_minimizing_drives_channel_norms_down() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(8, 3, 8, 8)
    decay = FeatureDecay(model, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def channel_norms() -> torch.Tensor:  # per-channel l2 norms at the first regularized input
        with torch.no_grad():
            return torch.relu(model.stem(x)).flatten(2).norm(dim=2).mean(0)

    before = channel_norms()
    model(x)
    start = decay.value().item()
    for _ in range(20):
        opt.zero_grad()
        model(x)
        decay.value().backward()
        opt.step()
    model(x)
    assert decay.value().item() < 0.5 * start
    after = channel_norms()
    assert (after <= before + 1e-6).all() and after.sum() < 0.5 * before.sum()


def test_remove_and_context_manager() -> None:
    model, x = Tiny(), torch.randn(2, 3, 6, 6)
    with FeatureDecay(model, 1.0) as decay:
        model(x)
        assert decay.value().item() > 0 and decay.active
    assert not decay.active
    assert not model._forward_pre_hooks and not model.head._forward_pre_hooks
    model(x)
    assert decay.value().item() == 0.0
    decay.reset()


def test_config_errors() -> None:
    model = Tiny()
    with pytest.raises(ConfigError, match="body.1"):
        FeatureDecay(model, 1.0, layers=["body.l"])
    with pytest.raises(ConfigError, match="weight"):
        FeatureDecay(model, -1.0)
    with pytest.raises(ConfigError, match="weight"):
        FeatureDecay(model, float("nan"))
    with pytest.raises(ConfigError, match="list"):
        FeatureDecay(model, 1.0, layers="head")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="layers="):
        FeatureDecay(nn.Sequential(nn.Conv2d(3, 4, 1)), 1.0)


_DDP_CHILD = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, sys.argv[2])
from test_feature_decay import Tiny
from ispc.feature_decay import FeatureDecay

torch.manual_seed(0)
model, x = Tiny(), torch.randn(3, 3, 6, 6)
plain = FeatureDecay(model, 0.5)
model(x)
expected = plain.value().detach()
plain.remove()
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
try:
    ddp = DistributedDataParallel(model)  # broadcasts parameters through gloo
    print("DDP_OK", flush=True)
    decay = FeatureDecay(ddp, 0.5, layers=["body.1", "head"])
    out = ddp(x)
    torch.testing.assert_close(decay.value(), expected)
    (out.mean() + decay.value()).backward()  # gradients flow through DDP's reducer
    assert model.head.weight.grad is not None
    decay.remove()
finally:
    dist.destroy_process_group()
print("DONE", flush=True)
"""


def test_distributed_data_parallel_same_value(tmp_path) -> None:
    """Runs in a child process with a hard timeout: gloo's set-up depends on the machine's network
    (hostname resolution, interfaces), and a hang there must not hang the suite."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _DDP_CHILD, str(tmp_path / "store"), str(Path(__file__).parent)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        if "DDP_OK" not in out:  # stuck in gloo itself, before FeatureDecay is involved
            pytest.skip("gloo did not set up a one-process group within 120 s on this machine "
                        "(its network set-up); FeatureDecay under DDP is unverified here")
        raise AssertionError(f"FeatureDecay under DDP hung after DDP was set up:\n{out}")
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout + proc.stderr


def test_default_sites_are_the_compile_candidates():
    import ispc
    from ispc.examples.models import mobilenet_v2_cifar
    from ispc.feature_decay import default_sites

    model = mobilenet_v2_cifar().eval()
    rep = ispc.inspect(model, [torch.randn(2, 3, 32, 32)], progress=False)
    candidates = [r.name for r in rep.layers if r.cv is not None]
    assert default_sites(model) == candidates
    assert not any("depthwise" in (rep.layer(n).reason or "") for n in candidates)
