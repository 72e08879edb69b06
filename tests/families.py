"""The architecture fields of each model family, for the tiny configs the tests build:
ModelConfig(**GPT2_ARCH, vocab_size=..., hidden_size=..., ...). Sizes stay with each test; they differ on purpose."""

GPT2_ARCH = dict(
    family="gpt2",
    norm="layernorm",
    position="learned",
    mlp="gelu",
    activation="gelu_tanh",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
)
# A BERT encoder without its head; tests add head="classifier" (with num_labels, pooler, ...) where they need one.
BERT_ARCH = dict(
    family="bert",
    norm="layernorm",
    norm_eps=1e-12,
    norm_position="post",
    position="learned",
    mlp="gelu",
    activation="gelu",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    causal=False,
    type_vocab_size=2,
    embed_norm=True,
    final_norm=False,
    head="none",
)
