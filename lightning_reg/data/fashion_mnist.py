"""Fashion-MNIST from its IDX files, resolved offline first.

The files are looked up, in order, in:

1. an explicit ``root``;
2. the ``FASHION_MNIST_ROOT`` environment variable;
3. Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``);
4. the cache folder ``~/.cache/lightning_reg/fashion-mnist``.

If none holds them, :func:`download_fashion_mnist` fetches the official files
into the cache (for real users with internet); if that fails too, the error
says how to get the files.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_URL",
    "download_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "resolve_fashion_mnist_root",
]

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_ROOT"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_reg" / "fashion-mnist"


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _complete(root: Path) -> bool:
    return all(_find(root, stem) is not None for stem in _FILES.values())


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (optionally gzipped) into a ``uint8`` tensor of its declared shape.

    Example:
        >>> import tempfile, struct
        >>> p = Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
        >>> _ = p.write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 3) + bytes([1, 2, 3]))
        >>> read_idx(p).tolist()
        [1, 2, 3]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = 1
    for s in shape:
        expected *= s
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: expected {expected} bytes of data, found {len(data) - offset}.")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(shape)


def resolve_fashion_mnist_root(root: str | Path | None = None, download: bool = False) -> Path:
    """Return the folder holding the four Fashion-MNIST IDX files.

    Args:
        root: An explicit folder, tried first.
        download: Fetch the official files into the cache if no folder has them.

    Raises:
        FileNotFoundError: If no folder has the files (and the download, if asked, failed).
    """
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates += [DEBIAN_ROOT, _cache_root()]
    for c in candidates:
        if _complete(c):
            return c
    if download:
        try:
            return download_fashion_mnist(_cache_root())
        except OSError as err:
            raise FileNotFoundError(_missing_message(candidates, f" The download failed: {err}.")) from err
    raise FileNotFoundError(_missing_message(candidates, " Pass `download=True` to fetch the official files."))


def _missing_message(candidates: list[Path], tail: str) -> str:
    where = ", ".join(str(c) for c in candidates)
    return (
        f"Fashion-MNIST IDX files not found in: {where}. On Debian/Ubuntu run"
        " `apt-get install dataset-fashion-mnist`, or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
        f" t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and set {ENV_VAR}=<folder>.{tail}"
    )


def download_fashion_mnist(dest: str | Path, base_url: str = FASHION_MNIST_URL, timeout: float = 30.0) -> Path:
    """Download the four official ``.gz`` files into ``dest`` and return it.

    Raises:
        OSError: If a download fails (e.g. no network).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in _FILES.values():
        target = dest / (stem + ".gz")
        if target.is_file():
            continue
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(base_url + stem + ".gz", timeout=timeout) as resp:
            tmp.write_bytes(resp.read())
        tmp.rename(target)
    return dest


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load a split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: See :func:`resolve_fashion_mnist_root`.
        download: See :func:`resolve_fashion_mnist_root`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Expected argument `split` to be one of ['train', 'test'], but got {split!r}.")
    folder = resolve_fashion_mnist_root(root, download)
    images = read_idx(_find(folder, _FILES[(split, "images")]))  # type: ignore[arg-type]
    labels = read_idx(_find(folder, _FILES[(split, "labels")])).long()  # type: ignore[arg-type]
    return images, labels
