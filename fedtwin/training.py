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
from fedtwin.tensors import get_weights, to_tensor


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
                # Opacus (1.5, 1.6) has no public flag for a skipped physical step; this private
                # attribute is the one Opacus-internal name fedtwin reads.
                if engine is not None and private_opt._is_last_step_skipped:
                    continue  # a physical piece of a logical batch: no step taken yet
                done += 1
                if done == steps:
                    break

    if engine is not None:
        new_history = [tuple(h) for h in engine.accountant.history]
        epsilon = epsilon_spent(new_history, plan.delta, plan.accountant)
        private.to_standard_module()  # remove Opacus' hooks: the caller gets plain modules back
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
