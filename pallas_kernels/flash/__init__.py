"""Block-sparse flash attention kernels (forward + backward) for TPU and GPU.

The sparsity pattern reaches a kernel as :class:`~pallas_kernels.flash.common.BlockTables`:
for each (batch, head, row block) the list of column blocks to visit, so the grid (TPU) or the
inner loop (GPU) runs over non-empty blocks only. See :mod:`pallas_kernels.flash.common`.
"""
