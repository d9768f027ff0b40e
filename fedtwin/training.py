"""One hospital's local round: DP-SGD (Opacus) on the private module, nothing else.

This is the science the ClientApp adapts; it knows nothing about Flower, so it can be
tested and benchmarked alone.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from fedtwin.models.base import DPTrainable
from fedtwin.privacy import History, PrivacyPlan, check_budget, epsilon_spent

Weights = "OrderedDict[str, np.ndarray]"


@dataclass
class RoundResult:
    """What a local round hands back: new weights and the privacy spent so far."""

    weights: OrderedDict[str, np.ndarray]
    history: History
    epsilon: float  # over every step this hospital ever took; inf when DP is off
    steps: int
    num_examples: int
    losses: dict[str, float] = field(default_factory=dict)
    optimizer_state: bytes = b""  # the hospital's optimizer moments, kept for its next round


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float ``(N, 1, H, W)`` in [-1, 1]."""
    return torch.tensor(images, dtype=torch.float32).div(127.5).sub(1.0).unsqueeze(1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``(N, 1, H, W)`` in [-1, 1] -> uint8 ``(N, H, W)``."""
    x = images.detach().squeeze(1).clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).cpu().numpy()


def get_weights(model: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """Floating-point state (parameters and running statistics) as numpy arrays.

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are not exchanged:
    averaging counters means nothing.
    """
    return OrderedDict(
        (k, v.detach().cpu().numpy().copy())
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    )


def set_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load arrays from ``get_weights``; names and shapes must match exactly."""
    own = model.state_dict()
    expected = {k for k, v in own.items() if v.is_floating_point()}
    if set(weights) != expected:
        missing, extra = expected - set(weights), set(weights) - expected
        raise ValueError(
            f"weights do not fit the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    for k, arr in weights.items():
        if tuple(arr.shape) != tuple(own[k].shape):
            raise ValueError(
                f"weights[{k!r}]: shape {arr.shape}, model expects {tuple(own[k].shape)}"
            )
        own[k] = torch.as_tensor(arr, dtype=own[k].dtype)
    model.load_state_dict(own)


def _secret_generator() -> torch.Generator:
    # Poisson sampling and DP noise must not be reproducible from anything published
    # (the run's seed is in the manifest): knowing them would let anyone undo the noise.
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def local_round(
    model: DPTrainable,
    images: np.ndarray,
    labels: np.ndarray,
    plan: PrivacyPlan,
    *,
    steps: int,
    batch_size: int,
    history: History,
    seed: int,
    device: str = "cpu",
    optimizer_state: bytes = b"",
) -> RoundResult:
    """Run ``steps`` local steps on one hospital's training images ``(N, H, W)`` uint8.

    With DP on: Poisson sampling at ``plan.sample_rate``, per-sample clipping to
    ``plan.max_grad_norm`` and Gaussian noise ``plan.noise_multiplier`` on the private
    module, every step recorded on top of ``history``. Refuses (BudgetExceeded) before
    touching the data if the steps would pass the hospital's budget.

    ``optimizer_state`` (from the previous round's result) restores the optimizers'
    moments: they are computed from noisy gradients only and never leave the hospital.
    """
    check_budget(plan, history, steps)
    model.to(device).train()
    data = TensorDataset(to_tensor(images), torch.tensor(labels, dtype=torch.long))
    private_opt, other_opts = model.make_optimizers()
    if optimizer_state:
        states = torch.load(io.BytesIO(optimizer_state), map_location=device, weights_only=True)
        for opt, state in zip([private_opt, *other_opts], states, strict=True):
            opt.load_state_dict(state)
    private = model.private_module()
    rng = torch.Generator().manual_seed(seed)  # the data-independent fakes: reproducible
    expected_batch = max(1, round(plan.sample_rate * len(data)))

    engine = None
    if plan.enabled:
        loader = DataLoader(data, batch_size=batch_size, generator=_secret_generator())
        with warnings.catch_warnings():
            # Opacus' secure_mode needs torchcsprng; the noise and sampling generators here
            # are seeded from os.urandom instead (see _secret_generator).
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=plan.accountant)
            engine.accountant.history = [tuple(h) for h in history]
            private, private_opt, loader = engine.make_private(
                module=private,
                optimizer=private_opt,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True,
                noise_generator=_secret_generator(),
            )
        if not math.isclose(private_opt.expected_batch_size, expected_batch, abs_tol=1):
            raise RuntimeError("sample rate differs from the privacy plan; refusing to train")
    else:
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(data) > batch_size,
            generator=torch.Generator().manual_seed(seed),
        )

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    done = 0
    physical = int(getattr(model, "max_physical_batch", 0) or 0)
    with ExitStack() as stack, warnings.catch_warnings():
        # Opacus' hooks fire on modules whose inputs need no gradient; that is expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if engine is not None and physical and physical < expected_batch:
            # Large logical batches in physical pieces; the optimizer steps once per logical
            # batch (the pieces before the last are "skipped" steps: accumulated only).
            loader = stack.enter_context(
                BatchMemoryManager(
                    data_loader=loader, max_physical_batch_size=physical, optimizer=private_opt
                )
            )
        while done < steps:
            for real, y in loader:
                losses = model.train_step(
                    private,
                    real.to(device),
                    y.to(device),
                    private_opt,
                    other_opts,
                    expected_batch,
                    rng,
                )
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                if engine is not None and private_opt._is_last_step_skipped:
                    continue  # a physical piece of a logical batch: no step taken yet
                done += 1
                if done == steps:
                    break

    if engine is not None:
        new_history = [tuple(h) for h in engine.accountant.history]
        epsilon = epsilon_spent(new_history, plan.delta, plan.accountant)
        private._close()  # remove Opacus' hooks: the caller gets plain modules back
    else:
        new_history, epsilon = list(history), math.inf
    model.cpu()
    buffer = io.BytesIO()
    torch.save([opt.state_dict() for opt in [private_opt, *other_opts]], buffer)
    return RoundResult(
        weights=get_weights(model),
        history=new_history,
        epsilon=epsilon,
        steps=steps,
        num_examples=len(data),
        losses={k: v / counts[k] for k, v in sums.items()},
        optimizer_state=buffer.getvalue(),
    )
