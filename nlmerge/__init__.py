"""nlmerge: non-local model merging on fused kernels.

Layers (each imports only the ones above it): ``nlmerge.ops`` (tensor ops: references and
dispatch) -> ``nlmerge.kernels`` (fused C++ and Triton kernels, called only by ``ops``) ->
``nlmerge.align`` (permutation alignment) and ``nlmerge.merge`` (state-dict merging).
"""
from nlmerge import align, merge, ops

__version__ = "0.1.0"
__all__ = ["align", "merge", "ops", "__version__"]
