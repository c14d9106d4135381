"""GGUF checkpoints (the llama.cpp format people keep small local models in), loaded through transformers.

``model.name_or_path`` may be a ``.gguf`` file, or a directory / hub id with ``model.gguf_file`` naming the file
in it. transformers reads GGUF files (``from_pretrained(..., gguf_file=...)``, with the optional ``gguf`` package:
``pip install 'lat-lightning[gguf]'``) and dequantises every weight; here it is asked to do so explicitly
(``GgufConfig(dequantize=True)``), into ``model.dtype``.

Why not use that model directly: transformers marks a model read from GGUF as *quantised by GGUF* (its
``hf_quantizer``, ``config.quantization_config``) even when every weight was unpacked into a plain tensor, and
``save_pretrained`` refuses quantised models whose quantiser cannot serialise, which GGUF's cannot. Asking for the
dequantisation explicitly makes transformers drop that mark (the model is then an ordinary one), so exports
(``final/``, ``interpolated/``, merged models) are normal safetensors checkpoints.

Reading a GGUF file is slow (its metadata is parsed in Python and each tensor unpacked with numpy: about 20 s
for a 135M model here), and a run loads the model in several stages. So the dequantised model and its tokenizer
are converted **once** with ``save_pretrained`` into ``$LAT_LIGHTNING_CACHE/gguf/<file>-<key>-<dtype>/`` (written
atomically; the key covers the file's path, size and modification time and the transformers version) and every
stage loads that directory. It takes the model's size in ``model.dtype`` on disk (e.g. 0.5 GB for 135M parameters
in float32, 14 GB for 7B in bfloat16); delete the directory to reclaim it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from lat_lightning.errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "gguf_source.json"  # written next to the converted model: where it came from


def is_gguf_path(name_or_path: Optional[str]) -> bool:
    """Whether a model name points at a GGUF file (by its suffix)."""
    return isinstance(name_or_path, str) and name_or_path.lower().endswith(GGUF_SUFFIX)


def require_gguf_package() -> None:
    """Raises ModelLoadError (one line) when the ``gguf`` package transformers needs is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "loading a .gguf model needs the gguf package: pip install 'lat-lightning[gguf]' (or pip install gguf)"
        )


def locate_gguf(name_or_path: str, gguf_file: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """The local ``.gguf`` file a config names.

    Args:
        name_or_path: a ``.gguf`` path, or (with ``gguf_file``) a directory or hub id holding the file.
        gguf_file: the file's name inside ``name_or_path``.
        revision: hub revision (hub ids only).

    Raises:
        ModelLoadError: the file does not exist, or a hub file is not in the local cache / cannot be downloaded.
    """
    if gguf_file is None:
        path = Path(os.path.expanduser(name_or_path))
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{name_or_path}' does not exist; set model.name_or_path to a .gguf file")
        return path.resolve()
    folder = Path(os.path.expanduser(name_or_path))
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in folder.glob(f"*{GGUF_SUFFIX}"))[:5]
            raise ModelLoadError(
                f"model.gguf_file '{gguf_file}' is not in {folder}"
                + (f"; .gguf files there: {', '.join(found)}" if found else "")
            )
        return path.resolve()
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model path '{name_or_path}' does not exist")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision)).resolve()
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo or file: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot get '{gguf_file}' of '{name_or_path}' from the hub: {first}") from None


def conversion_dir(path: Path, dtype: str) -> Path:
    """The cache directory of ``path`` converted in ``dtype``."""
    import transformers

    from lat_lightning.models.tiny import cache_root

    stat = path.stat()
    key = hashlib.blake2b(
        f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode(), digest_size=6
    ).hexdigest()
    return cache_root() / "gguf" / f"{path.stem}-{key}-{dtype}"


def ensure_converted(path: Path, dtype: str) -> Path:
    """Convert the GGUF file once into a ``save_pretrained`` directory (model dequantised to ``dtype`` +
    tokenizer) and return it; later calls return the cached directory.

    Raises:
        ModelLoadError: the gguf package is missing, or transformers cannot read the file.
    """
    target = conversion_dir(path, dtype)
    if (target / SOURCE_FILE).is_file():
        return target
    require_gguf_package()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model, tokenizer = _load_dequantised(path, dtype)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = path.stat()
        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {"gguf_file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": dtype}, indent=2
            )
            + "\n"
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_dequantised(path: Path, dtype: str):
    """Model and tokenizer of a GGUF file through transformers, every weight a plain tensor in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "dtype": getattr(torch, dtype)}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers: dequantises anyway, the stale mark is removed below
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"transformers cannot read the GGUF file {path}: {first}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if getattr(quantizer, "packed_modules", None):
            raise ModelLoadError(f"transformers kept some weights of {path} packed; they cannot be trained or saved")
        quantizer.remove_quantization_config(model)  # every weight is a plain tensor: drop the stale mark
    return model, tokenizer


__all__ = ["GGUF_SUFFIX", "conversion_dir", "ensure_converted", "is_gguf_path", "locate_gguf", "require_gguf_package"]
