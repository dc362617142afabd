"""Triton kernels, each beside a plain-PyTorch reference (installed as ``vdit_sparse.kernels``).

- :mod:`.block_sparse_attention`: block-sparse flash-attention forward over
  per-(batch, head, query block) key-block lists, optional key padding,
  log-sum-exp output and fused query-row permutation.
- :mod:`.indices`: block masks to those lists, on the mask's device.
- :mod:`.permute`: token permutation gather/scatter for chosen heads.
- :mod:`.column_sparse_attention`, :mod:`.column_mass`: Chipmunk's attention
  over per-query-group key columns, and the attention mass of each column.
- :mod:`.mlp_delta`: Chipmunk's feed-forward deltas (gathered hidden units).
- :mod:`.row_errors`: the search's per-row errors of candidate masks.
- :mod:`.reference`: the plain-PyTorch references the tests compare against.
- :mod:`.block_sizes`: the default block geometry every backend shares (no triton import).

Importing this package needs torch and triton only.  On a machine without a
GPU the kernels run in Triton's interpreter: export ``TRITON_INTERPRET=1``
before anything imports triton.
"""
