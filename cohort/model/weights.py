"""Weights as published: reading the files, caching the downloads, naming where they came from.

Two formats are read, both without running code from the file: ``.safetensors``
(safetensors' own reader) and everything else with ``torch.load(weights_only=True)``
(a ``.pth`` state dict, bare or under a ``"state_dict"`` key as MedicalNet's are).
Published files that are fetched (``--weights pretrained``) go to a cache next
to torchvision's (``$TORCH_HOME/hub/checkpoints/<repository>/<file>``); offline
and not cached, the error names the file, its URL and where to put it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cohort.errors import WeightsError

__all__ = [
    "Published",
    "StateDict",
    "Weights",
    "fetch",
    "read_state_file",
    "sha256_state",
    "strip_prefix",
]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Weights:
    """A state dict with where it came from (recorded in every output)."""

    state_dict: StateDict  # the key names the backbone's builder takes, CPU tensors
    source: str  # "imagenet", "pretrained", "random" or the file path
    detail: str  # human-readable provenance (weights entry and file, or seed)
    sha256: str  # of the file, or of the tensors for random weights
    dropped: tuple[str, ...] = ()  # published tensors that feature extraction does not use


@dataclass(frozen=True)
class Published:
    """A weights file as its authors publish it."""

    repository: str  # e.g. "TencentMedicalNet/MedicalNet-Resnet10" (Hugging Face)
    filename: str  # e.g. "resnet_10_23dataset.pth"
    licence: str  # of the weights, as published

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repository}/resolve/main/{self.filename}"

    def cache_path(self) -> Path:
        """Where the download is kept: next to torchvision's cache, one folder per repository."""
        folder = self.repository.replace("/", "--")
        return Path(torch.hub.get_dir()) / "checkpoints" / folder / self.filename


def fetch(published: Published, what: str, *, download: bool = True) -> Path:
    """The cached file of ``published``, downloaded first when missing and ``download``."""
    return cached_or_downloaded(
        published.cache_path(),
        published.url,
        lambda why: _missing(published, what, why),
        download=download,
    )


def cached_or_downloaded(
    path: Path, url: str, missing: Callable[[str], str], *, download: bool
) -> Path:
    """``path`` if it is there, else ``url`` downloaded to it; when that cannot be
    (downloads off, no network) a :class:`WeightsError` with ``missing(why)``."""
    if path.is_file():
        return path
    if not download:
        raise WeightsError(missing("downloads are off"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as err:
        raise WeightsError(missing(f"{type(err).__name__}: {err}")) from err
    return path


def _missing(published: Published, what: str, why: str) -> str:
    return (
        f"pretrained weights for {what} ({published.filename}) are not in the cache "
        f"({published.cache_path()}) and could not be downloaded ({why}). Download "
        f"{published.url} on a machine with internet and put the file at "
        f"{published.cache_path()} (or point TORCH_HOME at a cache that has it), or pass "
        "--weights PATH to the file, or --weights random for a run without pretrained knowledge"
    )


def read_state_file(path: Path, fits: str) -> StateDict:
    """The tensors of a weights file: ``.safetensors``, or a ``torch.save``d state dict,
    bare or under ``"state_dict"``. ``fits`` says what the file should hold (for errors)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error, OSError, ...
            raise WeightsError(
                f"cannot read safetensors file {path}: {type(err).__name__}: {err}; it must "
                f"hold {fits}"
            ) from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"cannot read weights file {path}: {type(err).__name__}: {err}; it must hold "
            f"{fits}, saved with torch.save or as .safetensors"
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # a training checkpoint: the weights and more
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise WeightsError(
            f"weights file {path} does not hold a state dict (str -> tensor, bare or under "
            f"'state_dict'); it must hold {fits}"
        )
    return dict(loaded)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """``state`` without ``prefix`` on its keys, when every key has it (``module.`` of a
    checkpoint saved from ``nn.DataParallel``)."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def sha256_state(state: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a state dict, independent of how it was serialised."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_fit(
    name: str,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    origin: str,
    fix: str,
    unit: str = "keys",
) -> None:
    """``state`` holds exactly the ``expected`` names with their shapes, or a
    :class:`WeightsError` names what is missing, extra or misshaped and ``fix``."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} {unit} ({', '.join(missing[:5])})")
        if extra:
            parts.append(f"unexpected {len(extra)} {unit} ({', '.join(extra[:5])})")
        raise WeightsError(f"weights {origin} do not fit {name}: {'; '.join(parts)}; {fix}")
    wrong = [k for k in sorted(expected) if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        key = wrong[0]
        raise WeightsError(
            f"weights {origin} do not fit {name}: {key} has shape {tuple(state[key].shape)}, "
            f"expected {tuple(expected[key])} ({len(wrong)} {unit} differ)"
        )
