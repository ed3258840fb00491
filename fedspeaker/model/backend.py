"""The scoring back end: the in-domain mean embedding, subtracted before cosine scoring.

A pretrained encoder meeting a new population scores better once the population's mean
embedding is removed (mean normalisation, as in every x-vector recipe). The back end is
part of the model (a :class:`Backend` submodule that its ``embed`` goes through), so the
server's scoring, the threshold, `identify`, `enroll`, `verify` and the TorchScript
export all use it without being told. Its mean is a non-persistent buffer: it is not in
the state dict, so it never travels with or gets averaged into the weights.

A back end is computed from embeddings of one set of encoder weights and names them by
:func:`encoder_fingerprint`; :func:`install_backend` refuses another model, and loading
other weights into a model drops a back end computed for the old ones.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedspeaker.errors import ModelError


class Backend(nn.Module):
    """Identity until a mean is installed; then unit embeddings minus the mean, made unit
    again (what cosine scoring of centred embeddings computes)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim), persistent=False)
        self.active = False
        self.fingerprint = ""  # the encoder weights the mean was computed with
        self.count = 0.0  # units the mean averages (noisy under DP)

    def forward(self, embeddings: Tensor) -> Tensor:
        if not self.active:
            return embeddings
        return F.normalize(F.normalize(embeddings, dim=-1) - self.mean, dim=-1)

    def clear(self) -> None:
        self.mean.zero_()
        self.active, self.fingerprint, self.count = False, "", 0.0

    def to_dict(self) -> dict[str, Any]:
        """What global_model.pt keeps of it (empty when none is installed)."""
        if not self.active:
            return {}
        return {"mean": self.mean.clone(), "fingerprint": self.fingerprint, "count": self.count}


def attach_backend(model: nn.Module, dim: int) -> None:
    """Give ``model`` an empty back end that is dropped whenever other weights are loaded."""
    model.backend = Backend(dim)
    model.register_load_state_dict_post_hook(_drop_stale_backend)


def _drop_stale_backend(module: nn.Module, _incompatible: Any) -> None:
    backend = getattr(module, "backend", None)
    if isinstance(backend, Backend) and backend.active and backend.fingerprint != encoder_fingerprint(module):
        backend.clear()


def encoder_fingerprint(model: nn.Module) -> str:
    """A digest of every weight the embedding depends on (all but the head's): two models
    with the same fingerprint embed alike, so a back end may move between them."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def install_backend(model: nn.Module, mean: Tensor, fingerprint: str, count: float = 0.0) -> None:
    """Put a back end computed with the weights ``fingerprint`` names into ``model``.

    Raises ModelError where ``model`` holds other weights: embeddings of one model centred
    with another's mean would score worse than not centred at all.
    """
    backend = getattr(model, "backend", None)
    if not isinstance(backend, Backend):
        raise ModelError(f"{type(model).__name__} has no scoring back end")
    mine = encoder_fingerprint(model)
    if fingerprint != mine:
        raise ModelError(f"this back end was computed from encoder weights {fingerprint}, but the "
                         f"model holds weights {mine}: a back end is applied only to the model "
                         "whose embeddings it was computed from")
    if mean.shape != backend.mean.shape or not torch.isfinite(mean).all():
        raise ModelError(f"a back end mean must be {tuple(backend.mean.shape)} finite floats, "
                         f"got {tuple(mean.shape)}")
    backend.mean.copy_(mean.float())
    backend.active, backend.fingerprint, backend.count = True, fingerprint, float(count)


def mean_of_sums(total: Tensor, count: float) -> Tensor:
    """The mean embedding from a summed statistic; a noisy count below one counts as one."""
    return total.float() / max(float(count), 1.0)
