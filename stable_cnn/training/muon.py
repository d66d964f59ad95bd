"""Muon for convolutions (optimizer=muon): torch.optim.Muon on every weight of rank 2 or
more, seen as the matrix (out, in x kernel), beside a fused SGD or AdamW for the rest,
as airbench trains its filters.

The loop, the schedule, the GradScaler and the checkpoint see one optimizer
(``MuonWithAuxiliary``) whose parameter groups are its two parts' own, so a schedule
scales both learning rates, clipping and unscaling reach every gradient, and one state
dict saves both. A step is skipped on the device like a fused optimizer's (``found_inf``):
Muon's part is put back by a select, the auxiliary skips inside its kernel. fp16's
GradScaler hands it the same verdict (``_step_supports_amp_scaling``), so no step waits
for the host to read it.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn

from stable_cnn.training.step import skips_on_device


def matrix_order(weight: torch.Tensor) -> list[int]:
    """The weight's dimensions, output first, the rest in memory order (outermost first):
    flattened in this order a weight of any layout (channels_last too) is a view."""
    rest = sorted(range(1, weight.ndim), key=lambda dim: -weight.stride(dim))
    return [0, *rest]


def as_matrix(tensor: torch.Tensor, order: list[int]) -> torch.Tensor:
    """(out, everything else): a view where the layout allows (the weight), else a copy
    (a gradient laid out otherwise). Muon's update does not depend on the order of the
    columns: orthogonalising a matrix with permuted columns permutes the result's."""
    return tensor.permute(order).reshape(tensor.shape[0], -1)


# torch.optim.Muon came with torch 2.9; on an older torch build_muon says so in one line
# before this class is ever made.
MUON = getattr(torch.optim, "Muon", torch.optim.Optimizer)


class MatrixMuon(MUON):
    """torch.optim.Muon for weights of rank 2 or more, each updated as a matrix (a 3x3
    convolution's filters: out x (in x 9)), in place through a view of the weight."""

    def __init__(self, weights: list[nn.Parameter], **settings) -> None:
        self.orders = {weight: matrix_order(weight) for weight in weights}
        self.matrices = {
            weight: as_matrix(weight.detach(), self.orders[weight]) for weight in weights
        }
        # Muon checks that it is given matrices; then its group holds the weights
        # themselves, so that clipping, unscaling and zero_grad find their gradients.
        super().__init__(list(self.matrices.values()), **settings)
        self.param_groups[0]["params"] = list(weights)
        for weight, matrix in self.matrices.items():
            # Zeros from the start (Muon would make them at its first step), so that a
            # skipped first step has a momentum to put back.
            self.state[weight]["momentum_buffer"] = torch.zeros_like(matrix)

    def _init_group(
        self,
        group: MutableMapping,
        params_with_grad: list[torch.Tensor],
        grads: list[torch.Tensor],
        muon_momentum_bufs: list[torch.Tensor],
    ) -> bool:
        for weight in group["params"]:
            if weight.grad is None:
                continue
            params_with_grad.append(self.matrices[weight])
            grads.append(as_matrix(weight.grad, self.orders[weight]))
            muon_momentum_bufs.append(self.state[weight]["momentum_buffer"])
        return False  # no complex weights

    def updated_tensors(self) -> list[torch.Tensor]:
        """What a step changes: each weight (as its matrix) and its momentum."""
        return [
            t
            for weight, matrix in self.matrices.items()
            if weight.grad is not None
            for t in (matrix, self.state[weight]["momentum_buffer"])
        ]


class MuonWithAuxiliary(torch.optim.Optimizer):
    """Muon for the weight matrices and a fused SGD or AdamW for the rest, as one
    optimizer: ``param_groups`` are Muon's group followed by the auxiliary's (the same
    dicts, so a schedule that sets a group's lr sets it where it is used)."""

    def __init__(self, muon: MatrixMuon, auxiliary: torch.optim.Optimizer | None) -> None:
        """``auxiliary``: None when Muon trains every parameter (a model without biases
        or BatchNorm, with optimizer.muon_head=true)."""
        self.muon, self.auxiliary = muon, auxiliary
        everything = [p for group in self.groups_of_both() for p in group["params"]]
        # Muon's defaults: a one-cycle schedule (LRSchedule) finds "momentum" there, and
        # cycles each group's "momentum" (the auxiliary AdamW's betas stay as set)
        super().__init__(everything, dict(muon.defaults))
        self.param_groups = self.groups_of_both()

    @property
    def skips_on_device(self) -> bool:
        """Whether step_unless_nonfinite() may hand it the step's verdict as
        ``found_inf`` (Muon's part is put back by a select; the auxiliary must be fused to
        skip inside its kernel: not on MPS, where the verdict is read on the host)."""
        return self.auxiliary is None or skips_on_device(self.auxiliary)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler.step's question: True makes it hand step() its verdict and scale as
        ``found_inf`` and ``grad_scale`` (device tensors) instead of reading the verdict on
        the host and calling step() only for a finite one."""
        return self.skips_on_device

    def muon_gradients(self) -> list[torch.Tensor]:
        return [weight.grad for weight in self.muon.matrices if weight.grad is not None]

    def groups_of_both(self) -> list[dict]:
        return self.muon.param_groups + (self.auxiliary.param_groups if self.auxiliary else [])

    @property
    def swept_groups(self) -> list[dict]:
        """The groups whose lr is optimizer.lr (the range test sweeps these; the
        auxiliary keeps its own optimizer.auxiliary_lr)."""
        return self.muon.param_groups

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("optimizer=muon takes no closure")
        # Set for this step only: found_inf (non-zero: skip) by step_unless_nonfinite()
        # or GradScaler.step, grad_scale by GradScaler.step where no unscale_ came first.
        skip = getattr(self, "found_inf", None)
        scale = getattr(self, "grad_scale", None)
        gradients = self.muon_gradients()
        if scale is not None and gradients:  # the auxiliary's kernel unscales its own
            torch._foreach_div_(gradients, scale)
        if skip is None:
            self.muon.step()
        else:
            before = [t.clone() for t in self.muon.updated_tensors()]
            self.muon.step()
            keep = skip.bool()
            for now, then in zip(self.muon.updated_tensors(), before, strict=True):
                now.copy_(torch.where(keep, then, now))
        if self.auxiliary is None:
            return
        self.auxiliary.found_inf, self.auxiliary.grad_scale = skip, scale
        try:
            self.auxiliary.step()
        finally:
            del self.auxiliary.found_inf, self.auxiliary.grad_scale

    def state_dict(self) -> dict:
        auxiliary = None if self.auxiliary is None else self.auxiliary.state_dict()
        return {"muon": self.muon.state_dict(), "auxiliary": auxiliary}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "auxiliary"}:
            raise ValueError("this optimizer state is not optimizer=muon's")
        self.muon.load_state_dict(state_dict["muon"])
        if self.auxiliary is not None:
            self.auxiliary.load_state_dict(state_dict["auxiliary"])
        # load_state_dict replaces the parts' group dicts: share the new ones again
        self.param_groups = self.groups_of_both()
