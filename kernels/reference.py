"""Plain-PyTorch references for the kernels in this folder (small shapes, tests only).

They build token-level masks (``S x S``) and are meant for checking, never for
speed.  Same signatures and conventions as the kernels.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "expand_block_mask",
    "indices_to_block_mask",
    "block_sparse_attention_reference",
    "column_mass_reference",
    "column_sparse_attention_reference",
    "gather_rows_reference",
    "masked_row_errors_reference",
    "mlp_delta_down_reference",
    "mlp_delta_up_reference",
    "permute_tokens_reference",
]


def indices_to_block_mask(kv_block_indices: torch.Tensor, kv_block_counts: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Bool ``(Bi, H, nQB, num_kv_blocks)``: True where a key block is listed within the row's count."""
    listed = torch.arange(kv_block_indices.shape[-1], device=kv_block_indices.device) < kv_block_counts[..., None].long()
    mask = torch.zeros(*kv_block_indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=kv_block_indices.device)
    # Entries past the count go to a spare column that is dropped.
    target = torch.where(listed, kv_block_indices.long(), num_kv_blocks)
    mask.scatter_(-1, target, True)
    return mask[..., :num_kv_blocks]


def expand_block_mask(block_mask: torch.Tensor, block_m: int, block_n: int, seq_len: int) -> torch.Tensor:
    """Block mask ``(..., nQB, nKB)`` -> token mask ``(..., S, S)``: query ``i`` sees key ``j`` iff block ``[i // block_m, j // block_n]`` is kept."""
    token_mask = block_mask.repeat_interleave(block_m, dim=-2)[..., :seq_len, :]
    return token_mask.repeat_interleave(block_n, dim=-1)[..., :seq_len]


def block_sparse_attention_reference(
    q, k, v, kv_block_indices, kv_block_counts, *, block_m, block_n, scale=None,
    key_padding_mask=None, return_lse=False, upcast=True, query_rows=None,
):
    """Masked softmax attention with the block plan expanded to tokens.

    ``query_rows`` (as in the kernel): the plan's query slot ``i`` is row
    ``query_rows[b, h, i]`` of q and of the output; computed here by gathering
    q, attending, and scattering the result back.

    ``upcast=True`` computes in float32 (float64 for float32 inputs): the
    reference.  ``upcast=False`` computes in the inputs' dtype: the "plain
    PyTorch in the same precision" baseline of the tests' tolerance rule.
    """
    batch, heads, seq_len, head_dim = q.shape
    if query_rows is not None:
        result = block_sparse_attention_reference(
            gather_rows_reference(q, query_rows), k, v, kv_block_indices, kv_block_counts, block_m=block_m,
            block_n=block_n, scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse, upcast=upcast,
        )
        out, lse = result if return_lse else (result, None)
        out = gather_rows_reference(out, query_rows, scatter=True)
        if return_lse:
            rows = query_rows.long().expand(batch, heads, seq_len)
            return out, torch.empty_like(lse).scatter_(2, rows, lse)
        return out
    num_kv_blocks = -(-seq_len // block_n)
    block_mask = indices_to_block_mask(kv_block_indices, kv_block_counts, num_kv_blocks)
    token_mask = expand_block_mask(block_mask, block_m, block_n, seq_len)
    return _masked_attention(q, k, v, token_mask, scale, key_padding_mask, return_lse, upcast)


def column_sparse_attention_reference(
    q, k, v, columns, counts, *, group_size, scale=None, key_padding_mask=None, return_lse=False, upcast=True,
):
    """:func:`~vdit_sparse.kernels.column_sparse_attention.column_sparse_attention` with the column lists
    expanded to an ``R x S`` token mask (group ``g`` of ``group_size`` rows sees its listed columns)."""
    rows, seq_len = q.shape[2], k.shape[2]
    listed = torch.arange(columns.shape[-1], device=columns.device) < counts[..., None].long()
    group_mask = torch.zeros(*columns.shape[:-1], seq_len + 1, dtype=torch.bool, device=columns.device)
    group_mask.scatter_(-1, torch.where(listed, columns.long(), seq_len), True)  # past the count: a spare column
    token_mask = group_mask[..., :seq_len].repeat_interleave(group_size, dim=-2)[..., :rows, :]
    return _masked_attention(q, k, v, token_mask, scale, key_padding_mask, return_lse, upcast)


def column_mass_reference(q: torch.Tensor, k: torch.Tensor, group_size: int,
                          key_padding_mask: torch.Tensor | None = None, chunk_bytes: int = 2**28) -> torch.Tensor:
    """:func:`~vdit_sparse.kernels.column_mass.column_mass` from the softmax itself: float32 ``(B, H, G, S)``, per
    group of ``group_size`` consecutive query rows each key's summed probability.  In chunks of groups, so memory
    stays near ``chunk_bytes``."""
    batch, heads, rows, _ = q.shape
    seq_len = k.shape[2]
    groups = -(-rows // group_size)
    per_group = batch * heads * group_size * seq_len * 4
    step = max(1, chunk_bytes // per_group)
    mass = torch.empty(batch, heads, groups, seq_len, dtype=torch.float32, device=q.device)
    for first in range(0, groups, step):
        last = min(groups, first + step)
        scores = torch.matmul(q[:, :, first * group_size : last * group_size], k.transpose(-1, -2)).float()
        scores.mul_(q.shape[-1] ** -0.5)
        if key_padding_mask is not None:
            scores.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        count = probs.shape[2]
        padded = (last - first) * group_size
        if count < padded:  # the last group is partial
            probs = torch.nn.functional.pad(probs, (0, 0, 0, padded - count))
        mass[:, :, first:last] = probs.view(batch, heads, last - first, group_size, seq_len).sum(dim=3)
    return mass



def _masked_attention(q, k, v, token_mask, scale, key_padding_mask, return_lse, upcast):
    """Softmax attention under a bool token mask ``(1 or B, H, R, S)`` (q has ``R`` rows, k and v ``S``); rows
    without a key give zeros (lse -inf)."""
    batch, heads, seq_len, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if key_padding_mask is not None:
        token_mask = token_mask & key_padding_mask[:, None, None, :]
    has_key = token_mask.any(dim=-1, keepdim=True)
    if not upcast and not return_lse:
        # In the inputs' dtype and without lse, PyTorch's own masked attention computes the same, in
        # less memory and time; a row with no key comes back NaN there and is zero by our convention.
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask, scale=scale)
        return out.masked_fill(~has_key, 0.0)
    compute = (torch.float64 if q.dtype == torch.float32 else torch.float32) if upcast else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if compute != torch.float64 else scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(has_key, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    out = (probs @ vc).to(q.dtype)
    if return_lse:
        return out, lse.float().expand(batch, heads, seq_len).contiguous()
    return out


def gather_rows_reference(x: torch.Tensor, rows: torch.Tensor, scatter: bool = False) -> torch.Tensor:
    """``out[b, h, i] = x[b, h, rows[b, h, i]]`` (``scatter``: ``out[b, h, rows[b, h, i]] = x[b, h, i]``)."""
    index = rows.long().expand(x.shape[:3])[..., None].expand(x.shape)
    if scatter:
        return torch.empty_like(x).scatter_(2, index, x)
    return torch.gather(x, 2, index)


def permute_tokens_reference(x: torch.Tensor, perm: torch.Tensor, inverse: bool = False, heads: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, h, t] = x[b, h, perm[t]]`` (``inverse``: ``out[b, h, perm[t]] = x[b, h, t]``).

    ``perm`` is ``(S,)`` or per-head ``(H, S)``; ``heads`` (bool ``(H,)`` or
    ``(B, H)``) limits the permutation to the marked heads, the others are copied.
    """
    from .indices import permutation_table

    return gather_rows_reference(x, permutation_table(perm, heads, x.shape[1], x.shape[2]), scatter=inverse)


def masked_row_errors_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    masks: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``(B, H, M)``: what :func:`~vdit_sparse.kernels.row_errors.masked_row_errors` computes.

    One pass of scores over the sampled rows serves every output: the
    unnormalised probabilities ``exp(s - max)`` are shared, and each output is
    its masked numerator over its masked denominator.  Matrix products run in
    q's dtype (probabilities rounded to it), the softmax and the errors in
    float32.
    """
    scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)).float()  # (B, H, R, S)
    scores.mul_(q.shape[-1] ** -0.5)
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    probs = scores.to(v.dtype)
    del scores

    def output(weights: torch.Tensor) -> torch.Tensor:
        return torch.matmul(weights, v).float() / weights.sum(dim=-1, dtype=torch.float32)[..., None]

    exact = output(probs)
    errors = [(output(probs * mask) - exact).pow(2).mean(dim=(-1, -2)) for mask in masks]
    return torch.stack(errors, dim=-1)


def mlp_delta_up_reference(x, weight, bias, units, activation, gelu="tanh"):
    """:func:`~vdit_sparse.kernels.mlp_delta.mlp_delta_up` in PyTorch (the weight rows gathered per block).

    ``gelu`` is a GELU's ``approximate`` or any elementwise callable (how
    Chipmunk runs feed-forwards whose activation the kernel does not know).
    """
    batch, tokens, _ = x.shape
    _, blocks, block, _ = activation.shape
    units = units.long()
    blocked = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - tokens)).view(batch, blocks, block, -1)
    pre = torch.einsum("bntc,bnmc->bntm", blocked, weight[units])
    if bias is not None:
        pre = pre + bias[units][:, :, None, :]
    new = gelu(pre) if callable(gelu) else torch.nn.functional.gelu(pre, approximate=gelu)
    index = units[:, :, None, :].expand_as(new)
    delta = new - activation.gather(-1, index)
    activation.scatter_(-1, index, new)
    return delta


def mlp_delta_down_reference(delta, weight_t, units, out):
    """:func:`~vdit_sparse.kernels.mlp_delta.mlp_delta_down` in PyTorch: ``out`` updated in place."""
    change = torch.einsum("bntm,bnmo->bnto", delta, weight_t[units.long()])
    out += change.reshape(out.shape[0], -1, out.shape[2])[:, : out.shape[1]]
