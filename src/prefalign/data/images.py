"""Images of content parts: where each comes from (`ImageRef`, validated when the row is read) and its pixels
(`ImageRef.load`, decoded when a batch needs them). Nothing here touches the network.

An image part's value may be
- a local path, absolute or relative to the data file's directory (`file://` paths too);
- a `datasets` Image feature: a PIL image (hub datasets) or the `{"bytes": ..., "path": ...}` dict that
  `to_list()` gives for parquet files;
- base64 data, bare or as a `data:image/...;base64,` URI; raw bytes.
A URL is refused: a run must not depend on the network, and training has none.

Every form is decoded the same way (EXIF orientation applied, then RGB), so the same picture gives the same
pixels and the same number of image tokens however it was given. transformers only applies EXIF to string
inputs, so handing it our own decoded images is what keeps the forms equal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from prefalign.errors import PrefalignError

_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")
_URL_SCHEMES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://")


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: a local file, encoded bytes, or an in-memory PIL image. Two refs are equal when they
    name the same file or hold the same bytes; `label`/`source` only serve error messages."""

    path: str | None = None
    data: bytes | None = None
    pil: Any = field(default=None, compare=False)  # a PIL image from a hub dataset
    label: str = field(default="", compare=False)  # e.g. "'prompt' message 1 part 0 (cat.png)"
    source: str = field(default="", compare=False)  # "file:line" of the row

    def _fail(self, reason: str) -> PrefalignError:
        return PrefalignError(f"{self.label}: {reason}", where=self.source or None)

    def load(self) -> Image.Image:
        """The RGB pixels (EXIF orientation applied); a one-line error naming row and image when unreadable."""
        try:
            if self.pil is not None:
                image = self.pil
            elif self.path is not None:
                image = Image.open(self.path)
            else:
                image = Image.open(io.BytesIO(self.data or b""))
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
        except FileNotFoundError:
            raise self._fail(f"no such image file: {self.path}") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise self._fail(f"cannot read the image: {_one_line(e)}") from None

    @property
    def digest(self) -> bytes:
        """What identifies the pixels (reference caches key on it): the encoded bytes' hash."""
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data)
        elif self.path is not None:
            h.update(_file_digest(self.path))
        else:
            h.update(self.pil.tobytes())
        return h.digest()

    @property
    def name(self) -> str:
        """A short name for reports: the file name, or what kind of data it was."""
        if self.path is not None:
            return Path(self.path).name
        return "in-memory image" if self.pil is not None else "inline data"


@lru_cache(maxsize=4096)
def _file_digest(path: str) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def data_directory(source: str) -> Path | None:
    """The directory of the data file a row came from ("path:line" / "path:row N"), or None (hub datasets)."""
    return _directory(source.rsplit(":", 1)[0]) if ":" in source else None


@lru_cache(maxsize=256)
def _directory(head: str) -> Path | None:
    path = Path(head)
    return path.parent if path.is_file() else None


def parse_image(value: Any, label: str, source: str) -> ImageRef:
    """An ImageRef for an image part's value, checked now so that a bad one stops the run at its row.

    Files must exist and start like an image; encoded data must decode. Pixels are not decoded here."""
    ref = _ref(value, label, source)
    if ref.pil is None and value is not ref:
        _check_header(ref)
    return ref


def _ref(value: Any, label: str, source: str) -> ImageRef:
    if isinstance(value, ImageRef):  # already read (a normalised message read again)
        return value
    if isinstance(value, Image.Image):
        return ImageRef(pil=value, label=label, source=source)
    if isinstance(value, dict):  # a datasets Image feature as to_list() gives it
        if value.get("bytes") is not None:
            return _ref(bytes(value["bytes"]), label, source)
        if value.get("path"):
            return _ref(str(value["path"]), label, source)
        raise PrefalignError(f"{label}: an image object needs 'bytes' or 'path'", where=source)
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value), label=label, source=source)
    if not isinstance(value, str) or not value:
        kind = "null" if value is None else type(value).__name__
        raise PrefalignError(f"{label}: an image must be a path, base64 data or an image object, got {kind}",
                             where=source)
    return _ref_from_string(value, label, source)


def _ref_from_string(value: str, label: str, source: str) -> ImageRef:
    if value.lower().startswith(_URL_SCHEMES):
        raise PrefalignError(f"{label}: image URLs are not fetched ({value[:80]}); download the image and give its "
                             "local path", where=source)
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise PrefalignError(f"{label}: a data URI image must be base64-encoded", where=source)
        return ImageRef(data=_b64(payload, label, source), label=label, source=source)
    text = value.removeprefix("file://")
    path = Path(text).expanduser()
    directory = data_directory(source)
    if not path.is_absolute() and directory is not None:
        path = directory / path
    if _is_file(path):
        return ImageRef(path=str(path), label=f"{label} ({text})", source=source)
    if _looks_like_base64(text):
        return ImageRef(data=_b64(text, label, source), label=label, source=source)
    where_hint = f" (relative paths are read from {directory})" if directory is not None and not Path(text).is_absolute() else ""
    raise PrefalignError(f"{label}: no such image file: {text}{where_hint}", where=source)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system: base64 data, not a path
        return False


def _looks_like_base64(text: str) -> bool:
    """Long and made of base64's alphabet only (a file name has a dot, so it never qualifies)."""
    return len(text) >= 32 and _BASE64.fullmatch(text) is not None


def _b64(payload: str, label: str, source: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PrefalignError(f"{label}: the image data is not valid base64", where=source) from None


def _check_header(ref: ImageRef) -> None:
    """Open the image lazily (the header only): missing, unreadable or non-image data fails here."""
    try:
        with (Image.open(ref.path) if ref.path is not None else Image.open(io.BytesIO(ref.data or b""))) as im:
            im.size  # noqa: B018 - the header is parsed by open(); size is what we need from it
    except FileNotFoundError:
        raise ref._fail(f"no such image file: {ref.path}") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ref._fail(f"cannot read the image: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
