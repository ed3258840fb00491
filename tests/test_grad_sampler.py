"""The cosine head's registered grad sampler (fedspeaker.privacy.grad_samplers): its
per-sample gradients are those Opacus's functorch fallback and per-sample autograd give,
for the head and for the whole trainable GE2E model; a DP step built on them clips and
averages exactly as by hand; speaker-level DP still folds them into per-speaker rows."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import DataLoader, TensorDataset

from fedspeaker.model.ge2e import CosineHead, GE2ESpeakerNet
from fedspeaker.privacy import grad_samplers
from fedspeaker.privacy.dpsgd import make_private, make_private_ghost
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.training.loops import PerSpeaker, fold_per_speaker, per_speaker_loss


def opacus_grad_samples(module: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, *,
                        force_functorch: bool) -> list[torch.Tensor]:
    """Opacus's per-sample gradients of ``loss_fn(module(x), y)`` (a mean over the batch),
    through the registered samplers or, with ``force_functorch``, functorch for every layer."""
    wrapped = GradSampleModule(module, force_functorch=force_functorch)
    loss_fn(wrapped(x), y).backward()
    samples = [p.grad_sample.clone() for p in module.parameters() if p.requires_grad]
    wrapped._close()  # removes the hooks and the grad_sample attributes
    for p in module.parameters():
        p.grad = None
    return samples


def looped_grad_samples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients by autograd, one sample at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(model.loss(model(x[i:i + 1]), y[i:i + 1]), params) for i in range(len(x))]
    return [torch.stack(column) for column in zip(*rows)]


def test_the_head_uses_the_registered_sampler_not_functorch() -> None:
    from opacus.grad_sample.grad_sample_module import GradSampleModule as Hooks

    assert Hooks.GRAD_SAMPLERS[CosineHead] is grad_samplers.cosine_head_grad_sample


@pytest.mark.parametrize("zero_row", [False, True])
def test_the_heads_per_sample_gradients_are_functorchs(zero_row: bool) -> None:
    torch.manual_seed(0)
    head = CosineHead(16, 5, scale=30.0).double()
    if zero_row:  # F.normalize divides a zero row by its eps: no projection, a huge gradient
        with torch.no_grad():
            head.weight[2] = 0
    x, y = torch.randn(12, 16, dtype=torch.float64), torch.randint(0, 5, (12,))
    loss = torch.nn.functional.cross_entropy
    ours, = opacus_grad_samples(head, loss, x, y, force_functorch=False)
    theirs, = opacus_grad_samples(head, loss, x, y, force_functorch=True)
    assert ours.shape == (12, 5, 16)
    scale = theirs.abs().max()
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-12)
    if not zero_row:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_the_whole_models_per_sample_gradients_are_functorchs_and_autograds() -> None:
    torch.manual_seed(0)
    model = GE2ESpeakerNet(26).double()  # the default model: projection and cosine head
    model.train()
    x, y = torch.randn(16, 256, 1, dtype=torch.float64), torch.randint(0, 26, (16,))
    ours = opacus_grad_samples(model, model.loss, x, y, force_functorch=False)
    theirs = opacus_grad_samples(model, model.loss, x, y, force_functorch=True)
    looped = looped_grad_samples(model, x, y)
    assert [g.shape[1:] for g in ours] == [p.shape for p in model.parameters()]
    for a, b, c in zip(ours, theirs, looped):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ghost", [False, True])
def test_a_dp_step_without_noise_is_the_mean_of_the_clipped_per_sample_gradients(ghost: bool) -> None:
    torch.manual_seed(0)
    model = GE2ESpeakerNet(6).double()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(40, 256, 1, dtype=torch.float64), torch.randint(0, 6, (40,))
    clip = 0.05  # below most per-sample norms here: clipping matters
    private = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                   loader=DataLoader(TensorDataset(x, y), batch_size=10), ledger=PrivacyLedger(),
                   noise_multiplier=0.0, max_grad_norm=clip, generator=torch.Generator().manual_seed(1))
    if ghost:
        _, dp_model, dp_optimizer, dp_loss, dp_loader = make_private_ghost(loss_fn=model.loss, **private)
    else:
        (_, dp_model, dp_optimizer, dp_loader), dp_loss = make_private(**private), model.loss
    xb, yb = next(iter(dp_loader))
    assert len(yb) > 1
    dp_optimizer.zero_grad()
    dp_loss(dp_model(xb), yb).backward()
    dp_optimizer.step()
    after = [p.detach().clone() for p in model.parameters()]
    dp_model.remove_hooks()
    with torch.no_grad():  # by hand, from the weights before the step
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    rows = looped_grad_samples(model, xb, yb)
    norms = torch.cat([g.flatten(1) for g in rows], dim=1).norm(dim=1)
    assert (norms > clip).sum() > len(yb) // 2
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's per-sample clipping factor
    for b, g, a in zip(before, rows, after):
        mean = torch.einsum("n,n...->...", factor, g) / dp_optimizer.expected_batch_size
        torch.testing.assert_close(a, b - mean, rtol=0, atol=1e-10)


@pytest.mark.parametrize("positive", [False, True])
def test_the_heads_ghost_norms_are_the_norms_of_its_per_sample_gradients(positive: bool) -> None:
    torch.manual_seed(2)
    head = CosineHead(16, 5, scale=30.0).double()
    with torch.no_grad():
        head.weight[3] = 2e-14 * torch.randn(16)  # a row under eps: divided by eps, not projected
    x = torch.randn(12, 16, dtype=torch.float64)
    x[4] = 0  # a zero embedding: normalised to zero
    backprops = torch.randn(12, 5, dtype=torch.float64)
    if positive:  # FedAwS's loss: backprops on the target column only
        backprops *= torch.nn.functional.one_hot(torch.randint(0, 5, (12,)), 5)
    norms = grad_samplers.cosine_head_norm_sample(head, [x], backprops)[head.weight]
    grads = grad_samplers.cosine_head_grad_sample(head, [x], backprops)[head.weight]
    torch.testing.assert_close(norms, grads.flatten(1).norm(dim=1), rtol=1e-10, atol=1e-10)


def test_ghost_clipping_takes_an_empty_poisson_batch_as_a_noise_only_step() -> None:
    torch.manual_seed(0)
    model = GE2ESpeakerNet(3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 256, 1), torch.randint(0, 3, (8,))
    _, dp_model, dp_optimizer, dp_loss, _ = make_private_ghost(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        loader=DataLoader(TensorDataset(x, y), batch_size=4), ledger=PrivacyLedger(), noise_multiplier=1.0,
        max_grad_norm=1.0, generator=torch.Generator().manual_seed(1), loss_fn=model.loss)
    dp_optimizer.zero_grad()
    dp_model(x[:0]).sum().backward()  # what train_epochs does with an empty batch
    dp_optimizer.step()
    moved = [(p.detach() - b).std().item() for p, b in zip(model.parameters(), before)]
    expected = 1.0 / dp_optimizer.expected_batch_size  # noise std (sigma * C) over the batch size
    assert all(0.8 * expected < m < 1.2 * expected for m in moved)


def test_speaker_level_dp_folds_the_heads_samples_into_each_speakers_mean_gradient() -> None:
    torch.manual_seed(1)
    model = GE2ESpeakerNet(3).double()
    windows = 4
    batch = torch.randn(3, windows, 256, 1, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(PerSpeaker(model, windows))
    per_speaker_loss(model.loss, windows)(wrapped(batch), labels).backward()
    fold_per_speaker(params, windows)()
    folded = [p.grad_sample.clone() for p in params]
    wrapped._close()
    assert [g.shape[0] for g in folded] == [3] * len(params)  # one row per speaker
    for speaker in range(3):
        alone = torch.autograd.grad(
            model.loss(model(batch[speaker]), labels[speaker].repeat(windows)), params)
        for row, expected in zip(folded, alone):
            torch.testing.assert_close(row[speaker], expected, rtol=0, atol=1e-10)
