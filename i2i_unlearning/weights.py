"""Weights from local files, never executing pickled code.

Formats: ``.safetensors``; a torch file (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``) read with
``torch.load(weights_only=True)``, which refuses any pickle that names a class or function outside
torch's tensor types (so a file that would run code fails before running it); or a diffusers model
folder (``diffusion_pytorch_model.safetensors`` or ``.bin``, optionally in a ``unet/`` sub-folder).
A checkpoint that wraps its state dict (``{"model": ...}`` as the official MAE release,
``{"state_dict": ...}`` as Lightning) is unwrapped; a DDP ``module.`` prefix is stripped.
Loading is strict: missing, unexpected or mis-shaped tensors fail with their names.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from i2i_unlearning.errors import ConfigError, UnsafeFileError

WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")


def _diffusers_file(folder: Path) -> Path:
    for sub in (folder, folder / "unet"):
        for name in DIFFUSERS_FILES:
            if (sub / name).is_file():
                return sub / name
    raise ConfigError(
        f"{folder} is a folder but holds none of {list(DIFFUSERS_FILES)} (nor a unet/ sub-folder with one); "
        "point the path at a weights file or a diffusers model folder"
    )


def _culprit(exc: Exception) -> str:
    """The line of torch's weights-only error that names what the pickle asked for (e.g. posix.system)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln or "GLOBAL" in ln]
    return f"The pickle asks for: {lines[0]}" if lines else ""


def refused(path: str | Path, exc: Exception, remedy: str) -> UnsafeFileError:
    """The project's error for a file ``torch.load(weights_only=True)`` refused: which file, why, what to do."""
    return UnsafeFileError(
        f"{path}: refused to load. The file is a pickle that holds more than tensors and plain data (loading it "
        f"could run code), so it was not loaded. {remedy} {_culprit(exc)}".rstrip()
    )


def load_trusted(path: str | Path, remedy: str):
    """``torch.load(path, weights_only=True)`` on CPU (explicitly, so no environment variable can turn it off);
    a refused file raises `UnsafeFileError` naming it, with ``remedy`` (what to do)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused(path, exc, remedy) from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, Tensor]:
    """The tensors of a local weights file or diffusers folder (see the module doc), on CPU.

    ``what`` names the config key in errors (e.g. "model.pretrained")."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{what}={path}: no such file or folder")
    if path.is_dir():
        path = _diffusers_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{what}={path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"{what}={path}: refused to load. The file is a pickle that holds more than tensors "
                f"(loading it could run code), and only plain state dicts are read (torch.load weights_only). "
                f"Convert it once, in a trusted environment, to a state dict or a .safetensors file. {_culprit(exc)}"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ConfigError(f"{what}={path}: not a readable torch weights file ({exc})") from None
    for key in WRAPPER_KEYS:  # {"model": state_dict, "epoch": ...} and the like
        if not _is_state_dict(obj) and isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            obj = obj[key]
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = list(obj)[:10] if isinstance(obj, Mapping) else []
        raise ConfigError(
            f"{what}={path}: holds a {kind} {keys if keys else ''}, not a state dict of tensors "
            f"(nor one under any of the keys {list(WRAPPER_KEYS)})"
        )
    obj = dict(obj)
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _listing(names: list[str], limit: int = 40) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def mismatch(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor]) -> str:
    """How ``state`` differs from the tensor names and shapes ``expected``: its missing, unexpected and
    mis-shaped names ("" when it has exactly those)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k])})"
                    for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    parts = [f"{len(missing)} missing: {_listing(missing)}" if missing else "",
             f"{len(unexpected)} unexpected: {_listing(unexpected)}" if unexpected else "",
             f"{len(shapes)} of another shape: {_listing(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def load_weights(module: nn.Module, path: str | Path, what: str = "weights",
                 state: dict[str, Tensor] | None = None) -> dict:
    """Load a local weights file into ``module`` strictly; returns {"path", "tensors"}.

    A module may define ``adapt_pretrained(state_dict) -> state_dict`` to accept an external layout
    (e.g. a bare diffusers UNet); a ConfigError it raises is reported with the file. Missing, unexpected
    and mis-shaped tensors fail with their names.
    ``state``: the file's tensors when the caller has already read them (`read_state_dict`)."""
    state = read_state_dict(path, what) if state is None else state
    adapt = getattr(module, "adapt_pretrained", None)
    if adapt is not None:
        try:
            state = adapt(state)
        except ConfigError as exc:
            raise ConfigError(f"{what}={path}: {exc}") from None
    problems = mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()}, state)
    if problems:
        raise ConfigError(
            f"{what}={path} does not fit {type(module).__name__} as configured: {problems}"
            ". Check that the model config (sizes, widths, depths) is the one the checkpoint was trained with"
        )
    module.load_state_dict(state, strict=True)
    return {"path": str(Path(path).expanduser()), "tensors": len(state)}
