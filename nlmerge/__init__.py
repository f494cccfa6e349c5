"""nlmerge: non-local model merging on fused kernels.

Layers (each imports only the ones above it): ``nlmerge.ops`` (tensor ops: references and
dispatch) -> ``nlmerge.kernels`` (fused C++ and Triton kernels, called only by ``ops``) ->
``nlmerge.merge`` (state-dict merging).
"""
from nlmerge import ops, merge

__version__ = "0.1.0"
__all__ = ["ops", "merge", "__version__"]
