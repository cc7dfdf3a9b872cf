"""Tests of ispc.datasets on tiny synthetic images (the real archive is touched by one optional test)."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from ispc.datasets import (  # noqa: E402
    CIFAR10,
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    default_cache_dir,
    iter_batches,
    load_images,
)
from ispc.errors import ConfigError, DataError  # noqa: E402

REAL_ARCHIVE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _pixels(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _image_folder(root: Path) -> list[np.ndarray]:
    """Three lossless images in nested folders, written in an order different from sorted order."""
    arrays = [_pixels(i) for i in range(3)]
    _write(root / "b" / "x.png", arrays[1])
    _write(root / "a.png", arrays[0])
    _write(root / "b" / "y.bmp", arrays[2])
    (root / "notes.txt").write_text("not an image")
    return arrays


def _as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# -- load_images ------------------------------------------------------------------------------------

def test_folder_sorted_recursive_and_scaled(tmp_path: Path) -> None:
    arrays = _image_folder(tmp_path)
    x = load_images(tmp_path)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8)
    torch.testing.assert_close(x, _as_tensor(arrays), rtol=0, atol=0)
    assert load_images(tmp_path, limit=2).shape[0] == 2


def test_normalize(tmp_path: Path) -> None:
    arrays = _image_folder(tmp_path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = load_images(tmp_path, mean=mean, std=std)
    ref = (_as_tensor(arrays) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref)
    with pytest.raises(ConfigError, match="channels"):
        load_images(tmp_path, mean=(0.5, 0.5))


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_tar_matches_folder(tmp_path: Path, suffix: str, mode: str) -> None:
    folder = tmp_path / "imgs"
    _image_folder(folder)
    archive = tmp_path / f"imgs{suffix}"
    with tarfile.open(archive, mode) as tar:
        for p in sorted(folder.rglob("*"), reverse=True):  # archive order != sorted order
            tar.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False)
    torch.testing.assert_close(load_images(archive), load_images(folder), rtol=0, atol=0)
    torch.testing.assert_close(load_images(archive, limit=1), load_images(folder, limit=1), rtol=0, atol=0)


def test_resize_shorter_side_then_center_crop(tmp_path: Path) -> None:
    _write(tmp_path / "wide.png", np.zeros((10, 20, 3), np.uint8))
    _write(tmp_path / "tall.png", np.full((30, 12, 3), 255, np.uint8))
    x = load_images(tmp_path, image_size=6)
    assert x.shape == (2, 3, 6, 6)
    assert torch.all(x[0] == 1) and torch.all(x[1] == 0)  # "tall" sorts first


def test_center_crop_takes_middle(tmp_path: Path) -> None:
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, 2:6] = 255  # the middle 4 columns are white
    _write(tmp_path / "m.png", arr)
    x = load_images(tmp_path, image_size=4)
    assert torch.all(x == 1)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", _pixels(0, 8, 8))
    _write(tmp_path / "b.png", _pixels(1, 6, 8))
    with pytest.raises(DataError, match="image_size"):
        load_images(tmp_path)
    assert load_images(tmp_path, image_size=4).shape == (2, 3, 4, 4)


def test_pt_float_uint8_and_errors(tmp_path: Path) -> None:
    t = torch.rand(5, 3, 6, 6)
    torch.save(t, tmp_path / "f.pt")
    torch.testing.assert_close(load_images(tmp_path / "f.pt"), t)
    assert load_images(tmp_path / "f.pt", limit=2).shape == (2, 3, 6, 6)
    assert load_images(tmp_path / "f.pt", image_size=4).shape == (5, 3, 4, 4)
    u = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    torch.save(u, tmp_path / "u.pt")
    torch.testing.assert_close(load_images(tmp_path / "u.pt"), u.float() / 255)
    torch.save(torch.rand(3, 4, 4), tmp_path / "3d.pt")
    with pytest.raises(DataError, match="4-D"):
        load_images(tmp_path / "3d.pt")
    torch.save(torch.zeros(1, 3, 2, 2, dtype=torch.int32), tmp_path / "int.pt")
    with pytest.raises(DataError, match="floating"):
        load_images(tmp_path / "int.pt")
    torch.save({"x": t}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match="dict"):
        load_images(tmp_path / "dict.pt")


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_images(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_images(bad)
    with pytest.raises(ConfigError):
        load_images(bad, limit=0)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="do not know"):
        load_images(tmp_path / "x.csv")


def test_iter_batches() -> None:
    t = torch.arange(10)
    assert [b.tolist() for b in iter_batches(t, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ConfigError):
        list(iter_batches(t, 0))


# -- CIFAR-10 ---------------------------------------------------------------------------------------

def _fake_cifar(root: Path, per_class: tuple[int, int] = (3, 2)) -> dict[str, list[tuple[int, np.ndarray]]]:
    """A CIFAR-like folder; returns the expected (label, pixels) per split in sorted order."""
    expected: dict[str, list[tuple[int, np.ndarray]]] = {"train": [], "test": []}
    for split, n in zip(("train", "test"), per_class):
        for label, cls in enumerate(CIFAR10_CLASSES):
            for i in range(n):
                arr = _pixels(1000 * (split == "test") + 10 * label + i, 32, 32)
                _write(root / split / cls / f"{i:04d}.png", arr)
                expected[split].append((label, arr))
    return expected


def test_cifar_folder_decodes_and_caches(tmp_path: Path) -> None:
    expected = _fake_cifar(tmp_path / "c")
    ds = CIFAR10(tmp_path / "c", cache_dir=tmp_path / "cache", progress=False)
    x, y = ds.arrays("train")
    assert x.shape == (30, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == [lab for lab, _ in expected["train"]]
    np.testing.assert_array_equal(x, np.stack([a for _, a in expected["train"]]))
    assert ds.arrays("test")[0].shape == (20, 32, 32, 3)
    assert ds.classes == CIFAR10_CLASSES and ds.num_classes == 10
    cache = ds.cache_file
    assert cache.exists()

    # a second instance reads the cache instead of decoding: prove it by breaking the decoder
    ds2 = CIFAR10(tmp_path / "c", cache_dir=tmp_path / "cache", progress=False)
    ds2._decode_all = None  # type: ignore[assignment]
    np.testing.assert_array_equal(ds2.arrays("train")[0], x)

    # changing the source changes the key, so it is decoded again
    _write(tmp_path / "c" / "test" / "cat" / "0099.png", _pixels(7, 32, 32))
    ds3 = CIFAR10(tmp_path / "c", cache_dir=tmp_path / "cache", progress=False)
    assert ds3.cache_file != cache
    assert ds3.arrays("test")[0].shape == (21, 32, 32, 3)
    with pytest.raises(ConfigError):
        ds3.arrays("val")


def test_cifar_archive_and_env_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path / "c", (1, 1))
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "c", arcname=".")
    monkeypatch.setenv("ISPC_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    ds = CIFAR10(archive, progress=False)
    folder = CIFAR10(tmp_path / "c", cache_dir=tmp_path / "other", progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(ds.arrays(split)[0], folder.arrays(split)[0])
        np.testing.assert_array_equal(ds.arrays(split)[1], folder.arrays(split)[1])
    assert ds.cache_file.parent == tmp_path / "envcache" and ds.cache_file.exists()


def test_cifar_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        CIFAR10(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    _write(tmp_path / "flat" / "a.png", _pixels(0, 32, 32))
    with pytest.raises(DataError, match="layout"):
        CIFAR10(tmp_path / "flat", cache_dir=tmp_path / "cache", progress=False).arrays("train")
    _write(tmp_path / "small" / "train" / "cat" / "0.png", _pixels(0, 8, 8))
    _write(tmp_path / "small" / "test" / "cat" / "0.png", _pixels(0, 8, 8))
    with pytest.raises(DataError, match="32x32"):
        CIFAR10(tmp_path / "small", cache_dir=tmp_path / "cache", progress=False).arrays("train")


def test_cifar_loader(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "c")
    ds = CIFAR10(tmp_path / "c", cache_dir=tmp_path / "cache", progress=False)
    x_np, y_np = ds.arrays("train")
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    # evaluation: in order, no augmentation, normalized
    ev = ds.loader("train", batch_size=8)
    batches = list(ev)
    assert len(batches) == len(ev) == 4 and batches[-1][0].shape == (6, 3, 32, 32)
    xs = torch.cat([b[0] for b in batches])
    ref = (torch.from_numpy(x_np).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(xs, ref)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(y_np))

    # training: every label once per epoch, deterministic per (seed, epoch), differs across epochs
    tr = ds.loader("train", batch_size=8, train=True, seed=3)
    assert tr.shuffle
    e0 = list(tr)
    assert sorted(torch.cat([b[1] for b in e0]).tolist()) == sorted(y_np.tolist())
    e0_again = list(ds.loader("train", batch_size=8, train=True, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, e0_again))
    tr.set_epoch(1)
    e1 = list(tr)
    assert not torch.equal(e0[0][0], e1[0][0])
    assert len(list(ds.loader("train", batch_size=8, train=True, drop_last=True))) == 3


def test_cifar_augmentation_is_crop_and_flip(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "c", (1, 1))
    ds = CIFAR10(tmp_path / "c", cache_dir=tmp_path / "cache", progress=False)
    loader = ds.loader("train", batch_size=10, train=True, shuffle=False, seed=0)
    images = loader.images.permute(0, 3, 1, 2).float()  # N C H W in 0..255
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    x, _ = next(iter(loader))
    pixels = (x * std + mean) * 255  # back to 0..255 (float rounding only)
    flips = 0
    for n in range(10):
        found = False
        for flip in (False, True):
            src = padded[n].flip(2) if flip else padded[n]
            for oy in range(9):
                for ox in range(9):
                    if torch.allclose(pixels[n], src[:, oy:oy + 32, ox:ox + 32], atol=1e-3):
                        found, flips = True, flips + flip
                        break
                if found:
                    break
            if found:
                break
        assert found, f"image {n} is not a padded crop (optionally flipped) of its source"


@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_real_archive_layout() -> None:
    """Read only the first members of the real archive: layout and class folders, nothing decoded."""
    from ispc.datasets import _split_of

    seen: list[tuple[str, str]] = []
    with tarfile.open(REAL_ARCHIVE, "r|gz") as tar:
        for m in tar:
            if m.isfile():
                sc = _split_of(m.name)
                assert sc is not None, m.name
                assert sc[1] in CIFAR10_CLASSES
                assert os.path.basename(m.name)[:4].isdigit()
                seen.append(sc)
                if len(seen) >= 5:
                    break
    assert seen[0] == ("train", "airplane")
    assert CIFAR10_CLASSES.index("airplane") == 0 and list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)
