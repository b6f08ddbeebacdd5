"""Pallas kernels for attention (TPU via Mosaic, GPU via Triton), importable without attnjax.

* :mod:`pallas_kernels.flash` — block-sparse flash attention, forward and backward.
* :mod:`pallas_kernels.decode` — split-K (flash-decoding) attention over a KV cache.
"""
