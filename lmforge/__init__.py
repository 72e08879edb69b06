"""lmforge: train transformer language models for less compute by reusing what is already trained."""

from lmforge.api import export_hf, load, read_checkpoint, save
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model import Transformer

__all__ = ["ModelConfig", "Transformer", "UserError", "export_hf", "load", "read_checkpoint", "save"]
__version__ = "0.1.0"
