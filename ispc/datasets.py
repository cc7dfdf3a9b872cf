"""Image loading for the CLI, the examples and calibration.

Two jobs: :func:`load_images` turns whatever a user points at (a folder, a tar archive, a saved
tensor) into one float tensor, and :class:`CIFAR10` serves the CIFAR-10 JPEG archive for training,
decoded once into a uint8 cache because decoding 60,000 JPEGs every epoch would dominate a CPU run.

Pillow is needed for anything that decodes images; a ``.pt`` file works without it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ispc.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "load_images",
    "load_labeled_images",
    "iter_batches",
    "default_cache_dir",
    "CIFAR10",
    "CIFAR10Loader",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# Bumped whenever the cache file's content or layout changes, so old caches are not misread.
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Generic image loading
# --------------------------------------------------------------------------------------------------

def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "decoding images needs Pillow, which is not installed; run `pip install pillow` "
            "(or pass a .pt file holding an N x C x H x W tensor instead)"
        ) from exc
    return Image


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(_TAR_SUFFIXES)


def _decode(data: bytes | Path, name: str, image_size: int | None) -> np.ndarray:
    """Decode one image to an H x W x 3 uint8 array, resized/cropped if ``image_size`` is set."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img = img.convert("RGB")
            if image_size is not None:
                img = _resize_center_crop(img, image_size)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # Pillow raises several unrelated types for a bad file
        raise DataError(f"cannot read image {name!r}: {exc}; remove or replace the file") from exc


def _resize_center_crop(img: Any, size: int) -> Any:
    """Resize the shorter side to ``size`` then crop the centre (the usual evaluation transform)."""
    Image = _pil()
    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            nw, nh = size, max(size, int(size * h / w))
        else:
            nw, nh = max(size, int(size * w / h)), size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        left = int(round((nw - size) / 2.0))
        top = int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def _check_positive_int(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{what} must be a positive integer or None, got {value!r}")


def _stack(arrays: list[np.ndarray], names: list[str]) -> torch.Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        other = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise DataError(
            f"images have different sizes ({names[0]!r} is {first[1]}x{first[0]}, "
            f"{names[other]!r} is {arrays[other].shape[1]}x{arrays[other].shape[0]}); "
            "pass image_size=... to resize and center-crop them to one size"
        )
    batch = torch.from_numpy(np.stack(arrays))  # N H W 3 uint8
    return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _from_folder(path: Path, image_size: int | None, limit: int | None) -> torch.Tensor:
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and _is_image_name(p.name)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise DataError(
            f"no images found under folder {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    files = files[:limit] if limit is not None else files
    names = [str(p) for p in files]
    return _stack([_decode(p, n, image_size) for p, n in zip(files, names)], names)


def _from_tar(path: Path, image_size: int | None, limit: int | None) -> torch.Tensor:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot open archive {str(path)!r}: {exc}") from exc
    with tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)),
            key=lambda m: m.name,
        )
        if not members:
            raise DataError(
                f"no images found in archive {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        members = members[:limit] if limit is not None else members
        # Read in archive order: for a compressed archive every backward seek re-decompresses.
        decoded: dict[str, np.ndarray] = {}
        for m in sorted(members, key=lambda m: m.offset_data):
            fh = tar.extractfile(m)
            if fh is None:  # pragma: no cover - isfile() members always have data
                raise DataError(f"cannot read {m.name!r} from archive {str(path)!r}")
            decoded[m.name] = _decode(fh.read(), f"{path}:{m.name}", image_size)
    names = [m.name for m in members]
    return _stack([decoded[n] for n in names], [f"{path}:{n}" for n in names])


def _from_pt(path: Path, image_size: int | None, limit: int | None) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"cannot load {str(path)!r} as a tensor file ({exc}); save it with torch.save(tensor, path)"
        ) from exc
    if not isinstance(obj, torch.Tensor):
        raise DataError(
            f"{str(path)!r} holds a {type(obj).__name__}, expected one N x C x H x W tensor"
        )
    if obj.dim() != 4:
        raise DataError(
            f"{str(path)!r} holds a tensor of shape {tuple(obj.shape)}, expected 4-D N x C x H x W"
        )
    if obj.dtype == torch.uint8:  # raw pixels: scale like decoded images
        x = obj.float().div_(255.0)
    elif obj.is_floating_point():
        x = obj.float()
    else:
        raise DataError(
            f"{str(path)!r} holds a {obj.dtype} tensor; expected a floating-point tensor "
            "(or uint8 pixels in 0..255, which are divided by 255)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{str(path)!r} holds an empty tensor (N = 0)")
    if limit is not None:
        x = x[:limit]
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        h, w = x.shape[-2:]
        scale = image_size / min(h, w)
        nh, nw = max(image_size, int(h * scale)), max(image_size, int(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((nh - image_size) / 2.0)), int(round((nw - image_size) / 2.0))
        x = x[..., top:top + image_size, left:left + image_size]
    return x.contiguous()


def _normalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    c = x.shape[1]
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) != c:
            raise ConfigError(f"{what} has {len(v)} values but the images have {c} channels; give "
                              "one per channel (command line: --mean/--std, or --normalize none "
                              "for data already normalized)")
    if std is not None and any(not (s > 0 and math.isfinite(s)) for s in std):
        raise ConfigError(f"std values must be positive and finite, got {tuple(std)}")
    if mean is not None:
        x = x - torch.tensor(mean, dtype=x.dtype).view(1, c, 1, 1)
    if std is not None:
        x = x / torch.tensor(std, dtype=x.dtype).view(1, c, 1, 1)
    return x


def load_images(
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
) -> torch.Tensor:
    """Load images as one float32 ``N x C x H x W`` tensor (C = 3 for decoded images).

    ``path`` is a folder (searched recursively), a ``.tar``/``.tar.gz``/``.tgz`` archive (read
    in place, nothing extracted) or a ``.pt`` file holding a 4-D tensor (uint8 is divided by 255).
    Files are taken in sorted path order, so ``limit`` picks a reproducible subset. Pixels are
    scaled to [0, 1]; with ``image_size`` the shorter side is resized to it, then centre-cropped;
    ``mean``/``std`` then normalize per channel.
    """
    _check_positive_int(image_size, "image_size")
    _check_positive_int(limit, "limit")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"image path {str(p)!r} does not exist; pass a folder, a .tar/.tar.gz/.tgz or a .pt file")
    if p.is_dir():
        x = _from_folder(p, image_size, limit)
    elif p.suffix.lower() == ".pt":
        x = _from_pt(p, image_size, limit)
    elif _is_tar(p):
        x = _from_tar(p, image_size, limit)
    elif _is_image_name(p.name):
        x = _stack([_decode(p, str(p), image_size)], [str(p)])
    else:
        raise DataError(
            f"do not know how to read {str(p)!r}; pass a folder of images, a .tar/.tar.gz/.tgz "
            "archive of images or a .pt file holding an N x C x H x W tensor"
        )
    return _normalize(x, mean, std)


def load_labeled_images(
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images and their class labels: ``(x N x C x H x W float32, y N int64, class names)``.

    ``path`` is a folder with one subfolder per class (labels follow the subfolders' sorted names,
    as torchvision's ``ImageFolder``; images are searched recursively inside each) or a ``.pt`` file
    holding ``(x, y)`` (a tuple/list, or a dict with keys ``x`` and ``y``). Pixels, ``image_size``,
    ``mean`` and ``std`` as in :func:`load_images`; ``limit`` keeps a fixed random subset (seed 0),
    so every class stays represented.
    """
    _check_positive_int(image_size, "image_size")
    _check_positive_int(limit, "limit")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"labelled data {str(p)!r} does not exist; pass a folder with one subfolder "
                        "per class, or a .pt file holding (x, y)")
    if p.is_dir():
        classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = [f.name for f in p.iterdir() if f.is_file() and _is_image_name(f.name)]
        if loose or not classes:
            raise DataError(f"{str(p)!r} has {'images outside class subfolders' if loose else 'no subfolders'}; "
                            "put each class's images in a subfolder named after the class")
        parts = [_from_folder(p / c, image_size, None) for c in classes]
        if len({t.shape[1:] for t in parts}) > 1:
            raise DataError(f"the classes of {str(p)!r} have images of different sizes; pass "
                            "image_size=... to resize and center-crop them to one size")
        x = torch.cat(parts)
        y = torch.cat([torch.full((t.shape[0],), i, dtype=torch.long) for i, t in enumerate(parts)])
    elif p.suffix.lower() == ".pt":
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot load {str(p)!r} ({exc}); save it with torch.save((x, y), path)") from exc
        if isinstance(obj, dict) and {"x", "y"} <= set(obj):
            obj = (obj["x"], obj["y"])
        if not (isinstance(obj, (tuple, list)) and len(obj) == 2
                and all(isinstance(t, torch.Tensor) for t in obj)):
            raise DataError(f"{str(p)!r} holds a {type(obj).__name__}; expected (x, y): an N x C x H x W "
                            "tensor and N integer labels, saved with torch.save((x, y), path)")
        x, y = obj
        if x.dim() != 4 or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise DataError(f"{str(p)!r} holds x of shape {tuple(x.shape)} and y of shape "
                            f"{tuple(y.shape)} ({y.dtype}); expected N x C x H x W and N integer labels")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            raise DataError(f"{str(p)!r} holds x of dtype {x.dtype}; expected float or uint8 pixels")
        x, y = x.float(), y.long()
        if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
            raise DataError(f"{str(p)!r} holds {x.shape[-2]}x{x.shape[-1]} images; a .pt file is "
                            "used as it is: save it at the input size, or drop image_size")
        classes = [str(c) for c in range(int(y.max()) + 1)] if y.numel() else []
    else:
        raise DataError(f"do not know how to read labels from {str(p)!r}; pass a folder with one "
                        "subfolder per class, or a .pt file holding (x, y)")
    if x.shape[0] == 0:
        raise DataError(f"{str(p)!r} holds no images")
    if limit is not None and limit < x.shape[0]:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:limit].sort().values
        x, y = x[keep], y[keep]
    return _normalize(x, mean, std).contiguous(), y, classes


def iter_batches(tensor: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield consecutive slices of ``tensor`` along dim 0 (views, no copies); the last may be shorter."""
    _check_positive_int(batch_size, "batch_size")
    for start in range(0, tensor.shape[0], batch_size):
        yield tensor[start:start + batch_size]


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$ISPC_CACHE_DIR`` if set, else ``~/.cache/ispc``."""
    env = os.environ.get("ISPC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ispc"


def _split_of(name: str) -> tuple[str, str] | None:
    """``.../train/<class>/<file>.jpg`` -> ("train", class); anything else -> None."""
    parts = name.replace("\\", "/").strip("/").split("/")
    if len(parts) < 3 or parts[-3] not in ("train", "test") or not _is_image_name(parts[-1]):
        return None
    return parts[-3], parts[-2]


class CIFAR10:
    """CIFAR-10 from the JPEG archive (or a folder with the same ``train|test/<class>/*.jpg`` layout).

    The images are decoded once into uint8 arrays and cached as ``.npz`` in ``cache_dir``
    (default :func:`default_cache_dir`), keyed by the source's content (archive: sha256; folder:
    names, sizes and mtimes), so a changed source is decoded again. Labels follow the
    alphabetical order of the class folders, which for CIFAR-10 is the standard order.
    """

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(
                f"CIFAR-10 source {str(self.path)!r} does not exist; pass the path of "
                "cifar10-jpeg.tar.gz or of a folder holding train/<class>/*.jpg and test/<class>/*.jpg"
            )
        if not (self.path.is_dir() or _is_tar(self.path)):
            raise DataError(
                f"CIFAR-10 source {str(self.path)!r} is neither a folder nor a .tar/.tar.gz/.tgz archive"
            )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.progress = progress
        self._data: dict[str, np.ndarray] | None = None
        self.classes: tuple[str, ...] = ()

    # -- cache -------------------------------------------------------------------------------------

    def _key(self) -> str:
        h = hashlib.sha256(f"ispc-cifar10-v{_CACHE_FORMAT}".encode())
        if self.path.is_dir():
            for p in sorted(self.path.rglob("*")):
                if p.is_file() and _split_of(p.relative_to(self.path).as_posix()):
                    st = p.stat()
                    h.update(f"{p.relative_to(self.path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()[:20]

    @property
    def cache_file(self) -> Path:
        """Where the decoded arrays of this source are (or will be) cached."""
        return self.cache_dir / f"cifar10-{self._key()}.npz"

    def _load(self) -> dict[str, np.ndarray]:
        if self._data is not None:
            return self._data
        cache = self.cache_file
        data: dict[str, np.ndarray] | None = None
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
            except Exception:  # corrupt/truncated cache: decode again
                data = None
        if data is None:
            data = self._decode_all()
            self._write_cache(cache, data)
        self.classes = tuple(json.loads(str(data["classes"])))
        self._data = data
        return data

    @staticmethod
    def _write_cache(cache: Path, data: dict[str, np.ndarray]) -> None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, **data)
            os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
        except OSError as exc:
            warnings.warn(f"could not write the CIFAR-10 cache {str(cache)!r} ({exc}); "
                          "the images will be decoded again next time", stacklevel=3)

    # -- decoding ----------------------------------------------------------------------------------

    def _entries(self) -> list[tuple[str, str, str]]:
        """(split, class, name) of every image in the source."""
        if self.path.is_dir():
            out = []
            for p in self.path.rglob("*"):
                rel = p.relative_to(self.path).as_posix()
                sc = _split_of(rel)
                if sc and p.is_file():
                    out.append((sc[0], sc[1], rel))
            return out
        with tarfile.open(self.path, "r:*") as tar:
            return [(*sc, m.name) for m in tar.getmembers() if m.isfile() and (sc := _split_of(m.name))]

    def _decode_all(self) -> dict[str, np.ndarray]:
        entries = self._entries()
        train_classes = sorted({c for s, c, _ in entries if s == "train"})
        test_classes = {c for s, c, _ in entries if s == "test"}
        if not train_classes or not test_classes:
            raise DataError(
                f"{str(self.path)!r} does not have the CIFAR-10 layout: expected images at "
                "train/<class>/*.jpg and test/<class>/*.jpg"
            )
        if not test_classes <= set(train_classes):
            raise DataError(
                f"{str(self.path)!r}: test classes {sorted(test_classes - set(train_classes))} "
                "have no train folder"
            )
        label = {c: i for i, c in enumerate(train_classes)}
        pixels: dict[str, np.ndarray] = {}
        bar = tqdm(total=len(entries), desc="decoding CIFAR-10 (once, then cached)", unit="img",
                   disable=not self.progress)
        try:
            if self.path.is_dir():
                for _, _, rel in entries:
                    pixels[rel] = _decode(self.path / rel, str(self.path / rel), None)
                    bar.update()
            else:
                with tarfile.open(self.path, "r:*") as tar:
                    for m in tar:  # one sequential pass over the (compressed) archive
                        if m.isfile() and _split_of(m.name):
                            fh = tar.extractfile(m)
                            assert fh is not None
                            pixels[m.name] = _decode(fh.read(), f"{self.path}:{m.name}", None)
                            bar.update()
        finally:
            bar.close()
        out: dict[str, np.ndarray] = {"classes": np.array(json.dumps(train_classes))}
        for split in ("train", "test"):
            items = sorted((label[c], name) for s, c, name in entries if s == split)
            imgs = [pixels[name] for _, name in items]
            bad = next((name for (_, name), a in zip(items, imgs) if a.shape != (32, 32, 3)), None)
            if bad is not None:
                raise DataError(f"{bad!r} is {pixels[bad].shape[1]}x{pixels[bad].shape[0]}, "
                                "CIFAR-10 images must be 32x32")
            out[f"{split}_x"] = np.stack(imgs)
            out[f"{split}_y"] = np.array([lab for lab, _ in items], dtype=np.int64)
        return out

    # -- access ------------------------------------------------------------------------------------

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 N x 32 x 32 x 3, labels int64 N)`` of ``"train"`` or ``"test"``."""
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        data = self._load()
        return data[f"{split}_x"], data[f"{split}_y"]

    @property
    def num_classes(self) -> int:
        self._load()
        return len(self.classes)

    def loader(
        self,
        split: str,
        *,
        batch_size: int = 128,
        train: bool = False,
        shuffle: bool | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
    ) -> "CIFAR10Loader":
        """Batches of normalized float images and labels; ``train=True`` adds crop+flip augmentation.

        ``shuffle`` defaults to ``train``. The order and augmentation of epoch ``e`` depend only on
        ``(seed, e)`` (see :meth:`CIFAR10Loader.set_epoch`), so a resumed run sees the same data.
        """
        x, y = self.arrays(split)
        return CIFAR10Loader(
            torch.from_numpy(x), torch.from_numpy(y), batch_size=batch_size, train=train,
            shuffle=train if shuffle is None else shuffle, seed=seed, device=device,
            drop_last=drop_last, mean=self.mean, std=self.std,
        )


class CIFAR10Loader:
    """Iterable over ``(images, labels)`` batches, augmentation vectorized over the whole batch.

    Kept as uint8 on ``device`` and converted per batch, so a GPU run copies the data once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        shuffle: bool,
        seed: int,
        device: str | torch.device,
        drop_last: bool,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int = 4,
    ) -> None:
        _check_positive_int(batch_size, "batch_size")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # N H W C uint8
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.shuffle = batch_size, train, shuffle
        self.seed, self.drop_last, self.pad = int(seed), drop_last, pad
        self.epoch = 0
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle/augmentation stream of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return g

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding plus horizontal flip, as one gather for the whole batch."""
        b, h, w, _ = x.shape
        p = self.pad
        xp = F.pad(x, (0, 0, p, p, p, p))  # pad H and W of N H W C with zeros (black pixels)
        oy = torch.randint(0, 2 * p + 1, (b, 1), generator=g)
        ox = torch.randint(0, 2 * p + 1, (b, 1), generator=g)
        flip = torch.rand(b, 1, generator=g) < 0.5
        ar_h, ar_w = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
        rows = oy + ar_h
        cols = ox + torch.where(flip, (w - 1) - ar_w, ar_w)
        bi = torch.arange(b).view(b, 1, 1)
        dev = x.device
        return xp[bi.to(dev), rows.view(b, h, 1).to(dev), cols.view(b, 1, w).to(dev)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self._generator()
        n = self.images.shape[0]
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size].to(self.device)
            x = self.images[idx]
            if self.train:
                x = self._augment(x, g)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = x.sub_(self._mean).div_(self._std).contiguous()
            yield x, self.labels[idx]
