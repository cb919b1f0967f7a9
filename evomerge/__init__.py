"""evomerge: evolutionary search for safe merges of language models.

The Python API comes first; the ``evomerge`` command line is a thin layer over it.
"""

from evomerge.errors import EvomergeError
from evomerge.pool import LoadOptions, ModelRef, Pool, load_model, load_tokenizer

__all__ = ["EvomergeError", "LoadOptions", "ModelRef", "Pool", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
