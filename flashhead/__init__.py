"""flashhead: a training-free, retrieval-based drop-in replacement for a language model's output head."""

from .data import load_text
from .models import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "load_text"]
