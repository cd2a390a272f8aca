"""GGUF checkpoints (the single-file format of llama.cpp, Ollama and LM Studio) as model input.

A model flag names a GGUF checkpoint when it is a `.gguf` file, or a directory without `config.json` that holds
exactly one. transformers builds the config, the tokenizer (vocabulary, merges, special tokens, chat template) and
the weights from the file's metadata and tensors; the weights are dequantized to the dtype asked for, so the model
is an ordinary dense one and everything downstream (LoRA, saving, merging) works as for a Hugging Face directory.

Three things transformers leaves to the caller, handled here:
- A GGUF-loaded model carries a "quantized with gguf" marker even though its weights are dense, and then refuses
  `save_pretrained`. Asking for dequantized weights (`GgufConfig(dequantize=True)`) drops the marker; the model
  keeps the .gguf path as its `name_or_path`, so that a saved adapter records a base our loader can reload.
- A tokenizer_config.json next to the file would override what the file says, so the tokenizer is read through an
  empty directory with the file given by its absolute path.
- bitsandbytes 4-bit loading cannot start from a GGUF file: the dense weights are written to a temporary Hugging
  Face directory first (`load_gguf_model` does that).

`read_info` reads only the file's header (architecture and tensor types; the vocabulary arrays are skipped, not
read) for the notices and the run summary: "GGUF Q4_1 (210 Q4_1, 61 F32, 1 Q8_0 tensors)".
"""

from __future__ import annotations

import re
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from prefalign.errors import PrefalignError
from prefalign.model.quant import after_4bit_load, bnb_kwargs
from prefalign.model.weights import is_main_process

SUFFIX = ".gguf"
EXTRA = "pip install 'prefalign[gguf]'"
# GGUF value types (spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md); 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_UNSUPPORTED = re.compile(r"architecture (\S+) is not supported")


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a GGUF file says about its model."""

    path: Path
    architecture: str
    tensor_types: dict[str, int]  # ggml type name -> number of tensors, most frequent first

    @property
    def quantization(self) -> str:
        """The quantization of most weights: the most frequent type other than the float ones norms are kept in."""
        quantized = [t for t in self.tensor_types if t not in ("F32", "F16", "BF16")]
        return (quantized or list(self.tensor_types) or ["F32"])[0]

    def describe(self) -> str:
        counts = ", ".join(f"{n} {t}" for t, n in self.tensor_types.items())
        return f"GGUF {self.quantization} ({counts} tensors)"


def find_gguf(name_or_path: str | None, flag: str) -> Path | None:
    """The .gguf file a model flag names, or None when it names something else (a Hugging Face directory, a hub id)."""
    if not name_or_path:
        return None
    p = Path(name_or_path).expanduser()
    if p.suffix.lower() == SUFFIX:
        if not p.is_file():
            raise PrefalignError(f"no such GGUF file: {name_or_path}", flag)
        return p.resolve()
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    files = sorted(f for f in p.iterdir() if f.suffix.lower() == SUFFIX and f.is_file())
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise PrefalignError(f"holds {len(files)} .gguf files ({names}); name the one to load", flag)
    return files[0].resolve() if files else None


def read_info(path: Path, flag: str) -> GGUFInfo:
    """Architecture and tensor types from the header alone (no tensor data, no vocabulary arrays materialised)."""
    require_gguf_package(flag)
    try:
        with open(path, "rb") as f:
            meta, types = _read_header(f)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise PrefalignError(f"{path} is not a readable GGUF file ({e})", flag) from None
    names = _type_names()
    counts = Counter(names.get(t, f"type{t}") for t in types)
    return GGUFInfo(path, str(meta.get("general.architecture", "unknown")), dict(counts.most_common()))


def _read_header(f: Any) -> tuple[dict[str, Any], list[int]]:
    def read(fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the header is truncated")
        return struct.unpack("<" + fmt, data)[0]

    def string() -> str:
        return f.read(read("Q")).decode("utf-8")

    def value(kind: int) -> Any:
        if kind == 8:
            return string()
        if kind == 9:  # arrays (the vocabulary, the merges) are skipped, not read
            item, n = read("I"), read("Q")
            for _ in range(n if item == 8 else 0):
                f.seek(read("Q"), 1)
            if item != 8:
                f.seek(struct.calcsize("<" + _SCALARS[item]) * n, 1)
            return None
        return read(_SCALARS[kind])

    if f.read(4) != b"GGUF":
        raise ValueError("no GGUF magic bytes at the start")
    version = read("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors, n_kv = read("Q"), read("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(read("I"))
    types = []
    for _ in range(n_tensors):
        string()  # tensor name
        f.seek(8 * read("I"), 1)  # its dimensions
        types.append(read("I"))
        read("Q")  # offset of its data
    return meta, types


def _type_names() -> dict[int, str]:
    import gguf  # optional extra (prefalign[gguf]); require_gguf_package has checked it is there

    return {t.value: t.name for t in gguf.GGMLQuantizationType}


def require_gguf_package(flag: str) -> None:
    """transformers needs the gguf package to read the file; say which extra to install instead of a traceback."""
    try:
        import gguf  # noqa: F401  (optional extra, prefalign[gguf]; only a .gguf input gets here)
    except ImportError:
        raise PrefalignError(f"loading a .gguf file needs the gguf package: {EXTRA}", flag) from None


def gguf_kwargs(path: Path) -> dict[str, Any]:
    """from_pretrained arguments that load the file with dense weights (and so without the quantization marker)."""
    kwargs: dict[str, Any] = {"gguf_file": str(path)}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5.24; older versions always dequantize and need strip_marker
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    return kwargs


def load_gguf(auto_class: Any, path: Path, flag: str, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained` of a GGUF file (a model class or AutoTokenizer), read through an empty directory
    so that nothing next to the file overrides it; transformers' errors become one-line PrefalignErrors."""
    require_gguf_package(flag)
    is_tokenizer = auto_class is transformers.AutoTokenizer
    where = gguf_kwargs(path) if not is_tokenizer else {"gguf_file": str(path)}  # a quantization is for weights
    with tempfile.TemporaryDirectory(prefix="prefalign-gguf-") as empty:
        try:
            loaded = auto_class.from_pretrained(empty, **where, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise PrefalignError(_reason(e, path), flag) from None
    if is_tokenizer:  # its saved files must neither name the temporary directory nor send a reload to the .gguf
        for key in ("is_local", "local_files_only", "gguf_file"):
            loaded.init_kwargs.pop(key, None)
    loaded.name_or_path = str(path)
    if hasattr(loaded, "config"):
        strip_marker(loaded)
        loaded.config._name_or_path = str(path)
    return loaded


def _reason(e: BaseException, path: Path) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    unsupported = _UNSUPPORTED.search(text)
    if unsupported:
        return (f"GGUF architecture {unsupported.group(1)!r} is not supported by transformers "
                f"{transformers.__version__} ({path.name})")
    if isinstance(e, ImportError):
        return f"loading a .gguf file needs the gguf package: {EXTRA} ({text})"
    return f"cannot load {path}: {text}"


def strip_marker(model: Any) -> None:
    """Drop transformers' "quantized with gguf" marker from a model whose weights are all dense (the legacy GGUF
    loader always dequantizes), so that it saves and trains as an ordinary model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "Gguf" not in type(quantizer).__name__:
        return
    if not all(type(p) is torch.nn.Parameter and p.dtype.is_floating_point for p in model.parameters()):
        raise PrefalignError("this GGUF checkpoint was loaded with packed (not dequantized) weights, which cannot be "
                             "trained or saved", str(getattr(model, "name_or_path", "")))
    quantizer.remove_quantization_config(model)
    if hasattr(model.config, "_is_quantized"):
        del model.config._is_quantized


def load_gguf_model(path: Path, args: Any, flag: str, quantize: bool, auto_class: Any, **kwargs: Any) -> Any:
    """A model (what `auto_class.from_pretrained` returns) from a GGUF file: dequantized to --dtype, or with
    `quantize` written densely to a temporary Hugging Face directory first and loaded from there in 4 bits
    (transformers cannot quantize a GGUF file with bitsandbytes directly). The model's `dequantized_from` says
    from what, for the notice printed here and the run summary."""
    info = read_info(path, flag)
    if not quantize:
        loaded = load_gguf(auto_class, path, flag, **kwargs)
        note = f"{info.describe()}, dequantized to {args.dtype}"
    else:
        dense = load_gguf(transformers.AutoModelForCausalLM, path, flag, dtype=torch.float32,
                          trust_remote_code=args.trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="prefalign-gguf-") as tmp:
            dense.save_pretrained(tmp)
            del dense
            try:
                loaded = auto_class.from_pretrained(tmp, **kwargs, **bnb_kwargs(args))
            except (OSError, ValueError, KeyError) as e:
                raise PrefalignError(f"cannot quantize {path.name} to 4 bits: {_reason(e, path)}", flag) from None
        note = f"{info.describe()}, dequantized and requantized to 4-bit {args.bnb_4bit_quant_type}"
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if quantize:
        after_4bit_load(model)
        model.name_or_path = model.config._name_or_path = str(path)  # not the temporary directory
    model.dequantized_from = note
    if is_main_process():
        print(f"{flag} {path.name}: {info.architecture} model, weights from {note}")
    return loaded
