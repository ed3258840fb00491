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
    again (what cosine scoring of centred embeddings computes); with a whitening matrix
    (backend-whiten), the centred embeddings times it, made unit."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim), persistent=False)
        self.register_buffer("whiten", torch.eye(dim), persistent=False)
        self.whitened = False
        self.active = False
        self.fingerprint = ""  # the encoder weights the mean was computed with
        self.count = 0.0  # units the mean averages (noisy under DP)

    def forward(self, embeddings: Tensor) -> Tensor:
        if not self.active:
            return embeddings
        centred = F.normalize(embeddings, dim=-1) - self.mean
        if self.whitened:
            centred = centred @ self.whiten
        return F.normalize(centred, dim=-1)

    def clear(self) -> None:
        self.mean.zero_()
        self.whiten.copy_(torch.eye(len(self.whiten)))
        self.active, self.whitened, self.fingerprint, self.count = False, False, "", 0.0

    def to_dict(self) -> dict[str, Any]:
        """What global_model.pt keeps of it (empty when none is installed)."""
        if not self.active:
            return {}
        saved = {"mean": self.mean.clone(), "fingerprint": self.fingerprint, "count": self.count}
        if self.whitened:
            saved["whiten"] = self.whiten.clone()
        return saved


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


def install_backend(model: nn.Module, mean: Tensor, fingerprint: str, count: float = 0.0,
                    whiten: Tensor | None = None) -> None:
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
    if whiten is not None and (whiten.shape != backend.whiten.shape or not torch.isfinite(whiten).all()):
        raise ModelError(f"a back end's whitening must be {tuple(backend.whiten.shape)} finite floats, "
                         f"got {tuple(whiten.shape)}")
    backend.mean.copy_(mean.float())
    backend.whiten.copy_(torch.eye(len(backend.whiten)) if whiten is None else whiten.float())
    backend.active, backend.fingerprint, backend.count = True, fingerprint, float(count)
    backend.whitened = whiten is not None


def install_saved_backend(model: nn.Module, saved: dict[str, Any]) -> None:
    """Install a back end as :meth:`Backend.to_dict` saved it."""
    install_backend(model, saved["mean"], saved["fingerprint"], saved.get("count", 0.0), saved.get("whiten"))


def mean_of_sums(total: Tensor, count: float) -> Tensor:
    """The mean embedding from a summed statistic; a noisy count below one counts as one."""
    return total.float() / max(float(count), 1.0)


WHITEN_REGULARISATION = 1.0  # times the mean eigenvalue, added to the scatter before inverting


def whitening_of_scatter(upper: Tensor, count: float, dim: int) -> Tensor:
    """The whitening matrix W (embeddings times W) of a summed scatter given as its upper
    triangle (row by row): the scatter per unit, projected onto the positive semidefinite
    matrices (DP noise makes it indefinite), plus WHITEN_REGULARISATION times its mean
    eigenvalue, inverted and factored (Cholesky), so that the nuisance directions the
    scatter spans are shrunk and the others kept."""
    rows, cols = torch.triu_indices(dim, dim)
    scatter = torch.zeros(dim, dim, dtype=torch.float64)
    scatter[rows, cols] = upper.double()
    scatter = (scatter + scatter.T - torch.diag(scatter.diagonal())) / max(float(count), 1.0)
    values, vectors = torch.linalg.eigh(scatter)
    values = values.clamp_min(0.0)
    values = values + WHITEN_REGULARISATION * max(float(values.mean()), 1e-8)
    inverse = (vectors / values) @ vectors.T
    return torch.linalg.cholesky(inverse).float()
