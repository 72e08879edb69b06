"""lmforge: train transformer language models for less compute by reusing what is already trained."""

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.io.checkpoints import export_hf, load, read_checkpoint, save
from lmforge.model.config import ModelConfig
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer

__all__ = [
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "UserError",
    "export_hf",
    "generate",
    "load",
    "read_checkpoint",
    "save",
]
__version__ = "0.1.0"
