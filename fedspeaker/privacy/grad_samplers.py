"""Per-sample gradients, in closed form, for the layers of ours that Opacus does not know.

Opacus computes per-sample gradients with a grad sampler registered for the layer's
class; for any other layer it falls back to functorch (``vmap`` over ``grad``), which
for the GE2E model's cosine head made a DP-SGD step tens of times a plain step.
Importing this module registers the cosine head's sampler with Opacus
(``opacus.grad_sample.register_grad_sampler``); Opacus then clips, noises and accounts
exactly as before: only how the per-sample gradients are computed changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import Tensor, nn

from fedspeaker.model.ge2e import CosineHead

NORMALIZE_EPS = 1e-12  # F.normalize's default: below it a vector is divided by eps, not its norm


@register_grad_sampler(CosineHead)
def cosine_head_grad_sample(layer: CosineHead, activations: list[Tensor], backprops: Tensor
                            ) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of ``logits = s * normalize(x) @ normalize(W).T``.

    With ``B`` the sample's backprops (dL_i/dlogits), ``u`` its normalised input and
    ``w_c = W_c / |W_c|``, the gradient of row c is
    ``s / |W_c| * sum_t B_tc (u_t - cos_tc w_c)``: the outer product a linear layer
    has, projected off ``w_c`` by the row normalisation. A row under ``F.normalize``'s
    eps is divided by eps (no projection), as autograd differentiates it.
    """
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    weight = layer.weight.to(backprops.dtype)
    norms = weight.norm(dim=1)
    unit_x, unit_w = F.normalize(x, dim=-1), F.normalize(weight, dim=-1)
    cosines = unit_x @ unit_w.T  # (n, ..., C)
    outer = torch.einsum("n...c,n...d->ncd", backprops, unit_x)
    along = torch.einsum("n...c,n...c->nc", backprops, cosines) * (norms > NORMALIZE_EPS)
    scale = layer.scale / norms.clamp_min(NORMALIZE_EPS)
    return {layer.weight: scale[:, None] * (outer - along[..., None] * unit_w)}


@register_norm_sampler(CosineHead)
def cosine_head_norm_sample(layer: CosineHead, activations: list[Tensor], backprops: Tensor
                            ) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms of the head, for ghost clipping, without the gradients.

    With one embedding per sample (2-d input), row c's gradient is
    ``s / |W_c| * B_c (u - cos_c w_c)``, whose squared norm is
    ``(s B_c / |W_c|)^2 (|u|^2 - cos_c^2)`` (``w_c`` is a unit vector): n x C numbers
    instead of n x C x D. Other shapes take the norms of :func:`cosine_head_grad_sample`.
    """
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    if x.dim() != 2:
        grads = cosine_head_grad_sample(layer, activations, backprops)[layer.weight]
        return {layer.weight: grads.flatten(1).norm(dim=1)}
    weight = layer.weight.to(backprops.dtype)
    norms = weight.norm(dim=1)
    unit_x = F.normalize(x, dim=-1)
    cosines = unit_x @ F.normalize(weight, dim=-1).T
    off_row = unit_x.square().sum(dim=1, keepdim=True) - cosines.square() * (norms > NORMALIZE_EPS)
    scale = layer.scale / norms.clamp_min(NORMALIZE_EPS)
    squared = ((backprops * scale).square() * off_row.clamp_min(0)).sum(dim=1)
    return {layer.weight: squared.sqrt()}
