"""Finding, reading and validating images.

Industrial cameras deliver 8-bit and 16-bit monochrome as often as RGB, so
gray, 16-bit and palette images are converted exactly (16-bit is scaled by its
full range, not clipped); every other mode Pillow can convert to RGB (CMYK,
YCbCr, HSV, ...) is converted by Pillow. What cannot be converted without
guessing - real transparency, float data outside [0, 1] and [0, 255],
truncated files - is refused with a message naming the file.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

from .errors import UFlowError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Never let PIL pad a truncated file with gray: a truncated image is an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """All image files under ``folder``, sorted, refusing an empty or missing folder."""
    folder = Path(folder)
    if not folder.exists():
        raise UFlowError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UFlowError(f"{folder}: is not a folder")
    found = list(_walk_images(folder)) if recursive else sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not found:
        raise UFlowError(f"{folder}: contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated list."""
    return list(iter_inputs(inputs))


def iter_inputs(inputs: Sequence[str | os.PathLike]) -> Iterator[Path]:
    """Like :func:`resolve_inputs`, but yields paths as folders are walked, so millions of inputs are never all in memory.

    Every argument is checked before the first path is yielded (a missing file
    or a pattern that matches nothing fails at once). Folders are walked in
    sorted order, one directory listing at a time; duplicates across arguments
    are dropped (that needs a set of the paths seen, so only with several arguments).
    """
    if not inputs:
        raise UFlowError("no input images given")
    for item in inputs:
        _check_input(str(item))
    return _expand_all(inputs)


def _expand_all(inputs: Sequence[str | os.PathLike]) -> Iterator[Path]:
    seen: set[Path] | None = set() if len(inputs) > 1 else None
    for item in inputs:
        for match in _expand(str(item)):
            if seen is not None:
                if match in seen:
                    continue
                seen.add(match)
            yield match


def input_base(inputs: Sequence[str | os.PathLike]) -> Path:
    """The folder that output paths mirror: the common folder of the arguments (a folder itself, a file's or a pattern's folder)."""
    anchors = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            anchors.append(path.resolve())
        elif glob.has_magic(str(item)):
            fixed = [part for part in path.parts[: next(i for i, p in enumerate(path.parts) if glob.has_magic(p))]]
            anchors.append(Path(*fixed).resolve() if fixed else Path.cwd())
        else:
            anchors.append(path.resolve().parent)
    return Path(os.path.commonpath(anchors))


def _check_input(text: str) -> None:
    path = Path(text)
    if path.is_dir():
        if next(_walk_images(path), None) is None:
            raise UFlowError(f"{path}: contains no images ({', '.join(IMAGE_SUFFIXES)})")
    elif path.is_file():
        if not is_image_file(path):
            raise UFlowError(f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    elif glob.has_magic(text):
        if next(_expand(text), None) is None:
            raise UFlowError(f"{text}: pattern matches no images")
    else:
        raise UFlowError(f"{text}: no such file or folder")


def _expand(text: str) -> Iterator[Path]:
    path = Path(text)
    if path.is_dir():
        yield from _walk_images(path)
    elif path.is_file():
        yield path
    else:
        yield from sorted(Path(p) for p in glob.glob(text, recursive=True) if is_image_file(Path(p)) and Path(p).is_file())


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` in the order of a sorted recursive listing, one directory in memory at a time.

    Hidden folders (``.git``, uflow's own ``.uflow-partial-*`` staging) are skipped.
    """
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            if entry.name.startswith("."):
                continue
            yield from _walk_images(path)
        elif entry.is_file() and is_image_file(path):
            yield path


def read_image(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None) -> np.ndarray:
    """Read an image as float32 RGB in [0, 1], shape (H, W, 3).

    ``source`` is a path, the encoded bytes or a binary file object (an upload);
    ``name`` is what error messages call it (default: the path, or "image").
    Raises :class:`UFlowError` naming it for anything unreadable or ambiguous.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise UFlowError(f"{name or 'image'}: empty file")
        source = io.BytesIO(source)
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        with Image.open(source) as img:
            img.load()
            return _to_rgb_float(img, label)
    except UFlowError:
        raise
    except FileNotFoundError:
        raise UFlowError(f"{label}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in reason.lower():
            reason = "file is truncated"
        elif isinstance(exc, Image.UnidentifiedImageError):
            reason = "not an image Pillow can decode"
        raise UFlowError(f"{label}: cannot read image ({reason})") from None


def _to_rgb_float(img: Image.Image, path: str) -> np.ndarray:
    mode = img.mode
    if img.width < 2 or img.height < 2:
        raise UFlowError(f"{path}: image is {img.width}x{img.height} pixels, too small")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(img, dtype=np.float64)
        if gray.min() < 0 or gray.max() > 65535:
            raise UFlowError(f"{path}: 32-bit integer image with values outside 0..65535 is not supported")
        full_scale = 65535.0 if mode != "I" or gray.max() > 255 else 255.0
        gray = (gray / full_scale).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        if not np.isfinite(gray).all() or gray.min() < 0 or gray.max() > 255:
            raise UFlowError(f"{path}: floating-point image with values outside [0, 255]; save it as 8- or 16-bit")
        # Float data in [0, 1] is taken as such; otherwise as Pillow reads it, on the 0..255 scale.
        gray = gray if gray.max() <= 1 else gray / 255.0
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        if rgba[:, :, 3].min() < 255:
            raise UFlowError(
                f"{path}: image has transparent pixels, whose colour is undefined; flatten it onto a background first"
            )
        return rgba[:, :, :3].astype(np.float32) / 255.0
    try:
        rgb = img.convert("RGB")
    except ValueError:
        raise UFlowError(f"{path}: Pillow cannot convert mode {mode} images to RGB; save it as RGB or gray") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth mask as a boolean (H, W) array: any non-zero pixel is defective."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            values = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I;16", "I") else img)
    except FileNotFoundError:
        raise UFlowError(f"{path}: no such mask file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UFlowError(f"{path}: cannot read mask ({reason})") from None
    return values > 0


ImageInput = str | os.PathLike | np.ndarray
ErrorHandler = Callable[[Path | None, str], None]


def read_inputs(images: Iterable[ImageInput], *, square: bool = False, on_error: ErrorHandler | None = None) -> Iterator[tuple[np.ndarray, Path | None]]:
    """:func:`as_float_image` over a stream of inputs.

    Without ``on_error`` the first unreadable image raises; with it, that image
    is reported as ``on_error(path, message)`` and skipped, so one bad file
    among a million does not throw away the rest.
    """
    for image in images:
        try:
            yield as_float_image(image, square=square)
        except UFlowError as exc:
            if on_error is None:
                raise
            on_error(None if isinstance(image, np.ndarray) else Path(image), str(exc))


def as_float_image(image: ImageInput, *, square: bool = False) -> tuple[np.ndarray, Path | None]:
    """Read a path or accept an array; returns float32 RGB (H, W, 3) in [0, 1] and the path if any."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise UFlowError(f"image array has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        else:
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise UFlowError("float image arrays must be finite and in [0, 1]")
        path = None
    else:
        path = Path(image)
        arr = read_image(path)
    if square and arr.shape[0] != arr.shape[1]:
        where = path if path is not None else "image array"
        raise UFlowError(f"{where}: is {arr.shape[1]}x{arr.shape[0]}; the mcait backbone needs square images (crop them first)")
    return arr, path
