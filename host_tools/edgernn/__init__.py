"""edgernn host tools: train, export, quantize, verify and compile step models.

This is the only part of edgernn that imports TensorFlow.
"""

from edgernnd import __version__

__all__ = ["__version__"]
