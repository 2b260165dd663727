"""Two optimizers as one: Muon for the blocks' hidden matrices, AdamW (or any other) for the rest.

Lightning's automatic optimization takes one optimizer per step: gradient clipping, accumulation,
the NaN guard, the learning-rate monitor and exact resume all go through it. ``CombinedOptimizer``
is that one optimizer. Its ``param_groups`` are its members' own group dicts, so a scheduler
that scales each group's rate (``LambdaLR``, ``LinearLR``, ``CosineAnnealingLR``, ``LinearWarmdown``)
moves every member's rate from its own base value.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The rule for Muon: ``(hidden, rest)``, where hidden is every 2-D weight inside ``model.blocks``.

    Those are the matrices that map the residual stream to itself (attention's key/query/value and
    output projections, the feed-forward layers): Muon orthogonalizes their updates. The rest are
    not hidden matrices in Muon's sense and stay with the element-wise optimizer: the embedding
    tables (one row per token or position, each updated on its own), lm_head (a classifier whose
    rows are read one per token; tied to the token table with ``tie_weights``), norm gains and
    biases (vectors).
    """
    blocks = getattr(model, "blocks", None)
    hidden_ids = {id(p) for p in blocks.parameters() if p.ndim == 2} if blocks is not None else set()
    hidden = [p for p in model.parameters() if id(p) in hidden_ids]
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    return hidden, rest


class _MemberStates(ChainMap):
    """The members' per-parameter states as one mapping: each parameter's read from and written to
    its own member's (a plain ChainMap would create it in the first member's defaultdict)."""

    def __getitem__(self, param):
        for state in self.maps:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __setitem__(self, param, value) -> None:
        for state in self.maps:
            if param in state:
                state[param] = value
                return
        raise KeyError(f"{param!r}: state is only replaced for a parameter a member already holds")


class CombinedOptimizer(Optimizer):
    """Several optimizers over disjoint parameters, stepped, zeroed, scheduled and saved as one.

    Its state dict holds each member's, in order; loading one written for other members (another
    count, another split of the parameters) raises ``ValueError``, as any optimizer's does.
    """

    def __init__(self, optimizers: Iterable[Optimizer]) -> None:
        self.optimizers = list(optimizers)
        params = [p for optimizer in self.optimizers for group in optimizer.param_groups for p in group["params"]]
        super().__init__(params, {})  # checks that no parameter is in two members
        self.defaults = {
            f"{type(optimizer).__name__}.{key}": value
            for optimizer in self.optimizers
            for key, value in optimizer.defaults.items()
        }
        for optimizer in self.optimizers:  # the learning-rate monitor's tags: lr-CombinedOptimizer/Muon, ...
            for i, group in enumerate(optimizer.param_groups):
                suffix = f"_{i}" if len(optimizer.param_groups) > 1 else ""
                group.setdefault("name", f"{type(optimizer).__name__}{suffix}")
        self.state = _MemberStates()
        self._link()

    def _link(self) -> None:
        """Point ``param_groups`` and ``state`` at the members' own (in place: wrappers keep references)."""
        self.param_groups[:] = [group for optimizer in self.optimizers for group in optimizer.param_groups]
        self.state.maps[:] = [optimizer.state for optimizer in self.optimizers]

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:  # Lightning's closure: forward and backward, once for all members
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            names = " + ".join(type(optimizer).__name__ for optimizer in self.optimizers)
            raise ValueError(f"the saved optimizer state is not {len(self.optimizers)} optimizers' ({names})")
        for optimizer, member_state in zip(self.optimizers, saved):
            optimizer.load_state_dict(member_state)
        self._link()  # loading replaced the members' group dicts and state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(optimizer).__name__ for optimizer in self.optimizers)})"


class LinearWarmdown(LambdaLR):
    """Each group at its own rate for the first ``1 - warmdown`` of ``total_steps``, then linearly to
    ``final_factor`` times that rate at the last step (the constant-then-decay schedule of the
    speedrun GPTs; torch has the pieces only as ``SequentialLR``, which a config file cannot build).

    With ``warmup_steps`` the rate first rises linearly from 1 / warmup_steps of itself.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmdown: float = 0.4,
        warmup_steps: int = 0,
        final_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        """
        Args:
            optimizer: The optimizer whose groups' rates are scaled.
            total_steps: Steps of the whole run (``trainer.max_steps``).
            warmdown: Fraction of the run, at its end, over which the rate decays.
            warmup_steps: Steps over which the rate rises to its base value first (0: none).
            final_factor: The rate at the last step, as a fraction of the base rate.
            last_epoch: The index of the last step taken (-1: a new run), as for every torch scheduler.
        """
        if total_steps < 1:
            raise ValueError(f"LinearWarmdown total_steps must be positive, got {total_steps}")
        if not 0.0 <= warmdown <= 1.0:
            raise ValueError(f"LinearWarmdown warmdown must be a fraction in [0, 1], got {warmdown}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"LinearWarmdown warmup_steps must be in 0..total_steps, got {warmup_steps}")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"LinearWarmdown final_factor must be in [0, 1], got {final_factor}")
        decay_start = total_steps * (1.0 - warmdown)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            if step <= decay_start or warmdown == 0.0:
                return 1.0
            progress = min(1.0, (step - decay_start) / (total_steps - decay_start))
            return 1.0 - (1.0 - final_factor) * progress

        super().__init__(optimizer, factor, last_epoch)


def optimizer_members(optimizers) -> list[Optimizer]:
    """The plain optimizers behind a run's optimizers: a ``CombinedOptimizer``'s members, in order."""
    return [m for o in optimizers for m in (o.optimizers if isinstance(o, CombinedOptimizer) else [o])]
