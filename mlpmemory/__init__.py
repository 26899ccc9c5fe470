"""mlpmemory: give any Hugging Face causal LM an MLP Memory (arXiv 2508.01832).

The pipeline, one module per stage:
corpus -> datastore (keys = hidden states, values = next tokens) -> index (FAISS)
-> targets (sparse kNN next-token distributions) -> memory training -> inference.
"""

__version__ = "0.1.0"

from .errors import MLPMemError  # noqa: E402,F401
