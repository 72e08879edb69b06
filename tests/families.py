"""The architecture fields of each model family, for the tiny configs the tests build:
ModelConfig(**GPT2_ARCH, vocab_size=..., hidden_size=..., ...). Sizes stay with each test; they differ on purpose.
The family's fixed switches come from the HF importer's own table (lmforge.model.shapes.FAMILY_SWITCHES); only the choices a
family leaves free are set here."""

from lmforge.model.shapes import FAMILY_SWITCHES


def _fixed(family: str) -> dict:
    return {"family": family, **{k: v for k, v in FAMILY_SWITCHES[family].items() if v != "any"}}


GPT2_ARCH = {**_fixed("gpt2"), "activation": "gelu_tanh", "tie_embeddings": True}
# A BERT encoder without its head; tests add head="classifier" (with num_labels, pooler, ...) where they need one.
BERT_ARCH = {**_fixed("bert"), "activation": "gelu", "norm_eps": 1e-12, "type_vocab_size": 2, "head": "none"}
