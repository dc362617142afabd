"""One attention layer's methods, each over its heads, and how one call of the layer runs.

A :class:`LayerRouting` holds the head groups a profile gives a layer (one
group in the common case).  For each call it asks every group's method for
the plan of its heads, joins the plans along the head axis, runs them in one
launch (:func:`vdit_sparse.plan.run_plan`) and lets each method finish its
heads' output.  Heads are numbered as in the model; a call that holds only
some of them (``AttentionCall.head_offset``, Ulysses context parallelism)
runs the groups' share of its heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .context import AttentionCall, StateStore
from .methods import AttentionMethod
from .methods.block_sparse import block_sizes_for, resolve_backend
from .plan import HeadPlan, combine_plans, dense_plan, run_plan, skip_plan

__all__ = ["HeadGroup", "LayerRouting"]


@dataclass
class HeadGroup:
    """One method over some of a layer's heads (model head indices)."""

    method: AttentionMethod
    heads: tuple[int, ...]


class LayerRouting:
    """The head groups of one attention layer, their shared block geometry and backend."""

    def __init__(self, layer_index: int, groups: list[HeadGroup]):
        self.layer_index = layer_index
        self.groups = groups
        # The profile checked that block-sparse groups agree on these (one launch).
        params = [g.method.params for g in groups if hasattr(g.method.params, "block_size")]
        self.block_size = params[0].block_size if params else None
        self.backend = params[0].backend if params else "auto"
        self._local: dict[tuple, list] = {}

    def uses_model_processor(self, call: AttentionCall) -> bool:
        return all(g.method.uses_model_processor(call) for g in self.groups)

    def _local_groups(self, head_offset: int, heads: int, device) -> list:
        """Per group: (group index, its heads in this call, their local positions as a slice or index tensor)."""
        key = (head_offset, heads, str(device))
        if key not in self._local:
            found, covered = [], 0
            for index, group in enumerate(self.groups):
                mine = [h for h in group.heads if head_offset <= h < head_offset + heads]
                if not mine:
                    continue
                local = [h - head_offset for h in mine]
                contiguous = local == list(range(local[0], local[0] + len(local)))
                select = slice(local[0], local[-1] + 1) if contiguous else torch.tensor(local, device=device)
                found.append((index, tuple(mine), select, torch.tensor(local, device=device)))
                covered += len(local)
            if covered != heads:
                raise RuntimeError(
                    f"layer {self.layer_index}: the profile's head groups cover {covered} of the call's {heads} heads "
                    f"(heads {head_offset}..{head_offset + heads - 1})"
                )
            self._local[key] = found
        return self._local[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, store: StateStore) -> torch.Tensor:
        """q, k, v ``(B, H, S, D)`` of this call's heads -> output ``(B, H, S, D)``."""
        batch, heads, seq_len, head_dim = q.shape
        backend = resolve_backend(self.backend, q)
        block_m, block_n = block_sizes_for(self.block_size, head_dim)
        runs = []
        for index, model_heads, select, local in self._local_groups(call.head_offset, heads, q.device):
            group = self.groups[index]
            group_call = dataclasses.replace(
                call, heads=model_heads, block_m=block_m, block_n=block_n, backend=backend,
                state=store.slot((self.layer_index, call.step.call_kind, index)),
            )
            gq, gk, gv = q[:, select], k[:, select], v[:, select]
            own = None
            if group.method.uses_model_processor(group_call):  # dense on this call, beside heads that are not
                plan, path = dense_plan(seq_len, len(model_heads), block_m, block_n, q.device), "dense"
            elif group.method.computes_attention:  # its own launch; nothing for these heads in the joint one
                own, fraction = group.method.attend(gq, gk, gv, group_call)
                plan, path = skip_plan(seq_len, len(model_heads), block_m, block_n, q.device), group.method.name
            else:
                plan, path = group.method.plan(gq, gk, gv, group_call), group.method.name
            call.stats.record(path, plan.density if own is None else fraction, batch * len(model_heads), seq_len)
            runs.append((group, group_call, select, local, plan, (gq, gk, gv), own))
        if len(runs) == 1 and runs[0][-1] is not None:  # one method computed every head itself: its output is it
            out = runs[0][-1]
        elif all(own is not None for *_, own in runs):
            out = torch.empty_like(q)
        else:
            if len(runs) == 1:
                plan: HeadPlan = runs[0][4]
            else:
                plan = combine_plans([(local, run_plan_) for _, _, _, local, run_plan_, _, _ in runs], heads, seq_len)
            out = run_plan(q, k, v, plan, call.key_padding_mask, backend)
        for group, group_call, select, _, _, (gq, gk, gv), own in runs:
            if own is not None and own is not out:
                out[:, select] = own
            mine = out[:, select]
            finished = group.method.finish(mine, gq, gk, gv, group_call)
            if finished is not mine:
                out[:, select] = finished
        return out
