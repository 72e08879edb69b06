"""Decoding with the KV cache gives what re-running the whole sequence gives; sampling is seeded;
`lmforge generate` prints a continuation for a tiny model saved with its tokenizer."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.generate import generate, sample_next
from lmforge.model.transformer import Transformer
from tests.families import GPT2_ARCH

TINY_GQA = ModelConfig(
    family="llama",
    vocab_size=96,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_size=64,
    max_seq_len=64,
)
TINY_GPT2 = ModelConfig(
    **GPT2_ARCH, vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, ffn_size=128, max_seq_len=40
)
TINY_WINDOW = TINY_GQA.replace(family="mistral", sliding_window=5)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.3)  # peaked next-token distributions: greedy paths with clear winners
    return model.eval()


def greedy_without_cache(model: Transformer, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def prompt(cfg: ModelConfig, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [TINY_GQA, TINY_GPT2, TINY_WINDOW], ids=["llama-gqa", "gpt2-learned", "window"])
def test_greedy_with_cache_equals_full_recompute(cfg):
    model = random_model(cfg)
    ids = prompt(cfg)
    n = cfg.max_seq_len - ids.shape[1] if cfg.position == "learned" else 20
    got = generate(model, ids, max_new_tokens=n, greedy=True)
    assert got.shape == (2, ids.shape[1] + n)
    assert torch.equal(got, greedy_without_cache(model, ids, n))
    assert torch.equal(generate(model, ids, max_new_tokens=n, temperature=0.0), got)  # temperature 0 is greedy


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_model(TINY_GQA)
    ids = prompt(TINY_GQA)

    def sample(seed, **kw):
        return generate(model, ids, max_new_tokens=24, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = generate(model, ids, max_new_tokens=24, greedy=True)
    assert not torch.equal(a, greedy)  # temperature 1 over 96 tokens does leave the greedy path
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)  # the nucleus shrinks to the most likely token


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)  # softmax ~ .64 .24 .09 .03 .01
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {0, 1}  # .64 < .8 <= .88
    assert set(sample_next(logits, top_p=0.9, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, generator=g).tolist()) == {0, 1, 2, 3, 4}
    low_t = sample_next(logits, temperature=0.05, generator=g)
    assert low_t.eq(0).all()


def test_stops_when_every_row_hits_eos():
    model = random_model(TINY_GQA)
    ids = prompt(TINY_GQA)
    T, n = ids.shape[1], 10
    greedy = generate(model, ids, max_new_tokens=n, greedy=True)
    new0, new1 = greedy[0, T:].tolist(), greedy[1, T:].tolist()
    k = next(i for i in range(1, n) if new0[i] not in new0[:i])  # a token row 0 first writes at step k >= 1
    eos = new0[k]
    got = generate(model, ids, max_new_tokens=n, greedy=True, eos_id=eos)
    j = new1.index(eos) if eos in new1 else n  # where row 1 ends, if it does
    assert got.shape[1] == T + min(n, max(k, j) + 1)  # stops once both rows are done
    assert torch.equal(got[0, : T + k + 1], greedy[0, : T + k + 1])
    assert (got[0, T + k + 1 :] == eos).all()  # a finished row repeats eos
    assert torch.equal(got[1, : T + j + 1], greedy[1, : T + j + 1])
    one = generate(model, ids[:1], max_new_tokens=n, greedy=True, eos_id=eos)
    assert torch.equal(one, greedy[:1, : T + k + 1])


def test_bad_arguments():
    model = random_model(TINY_GQA)
    ids = prompt(TINY_GQA)
    for kw in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UserError):
            generate(model, ids, max_new_tokens=3, **kw)
    with pytest.raises(UserError, match="learned positions"):
        generate(random_model(TINY_GPT2), ids, max_new_tokens=TINY_GPT2.max_seq_len)
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


# ---- the command ---------------------------------------------------------------------------------
TEXT = ["the cat sat on the mat. the dog sat on the log. " * 4, "a bird in the hand is worth two in the bush."] * 10


def tiny_tokenizer_files() -> dict[str, bytes]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_GQA.vocab_size + 200,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    return {
        "tokenizer.json": tok.to_str().encode(),
        "special_tokens_map.json": b'{"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}',
    }


@pytest.fixture
def tiny_model_dir(tmp_path):
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.io.checkpoints import save

    files = tiny_tokenizer_files()
    vocab = Tokenizer.from_files(files).vocab_size
    cfg = TINY_GQA.replace(vocab_size=vocab)
    model = random_model(cfg)
    save(model, tmp_path / "tiny", tokenizer_files=files)
    return tmp_path / "tiny", model, Tokenizer.from_files(files)


def test_cli_prints_a_continuation(tiny_model_dir, capsys):
    path, model, tok = tiny_model_dir
    assert main(["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "8", "--greedy"]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor([tok.encode("the cat")])
    new = generate(model, ids, max_new_tokens=8, greedy=True, eos_id=tok.eos_id)[0, ids.shape[1] :].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert out == "the cat" + tok.decode(new, skip_special_tokens=True) + "\n"
    assert len(out) > len("the cat\n")

    argv = ["generate", str(path), "--prompt", "a bird", "--max-new-tokens", "12", "--seed", "7", "--top-k", "20"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.startswith("a bird")


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    from lmforge.io.checkpoints import save

    path, model, _ = tiny_model_dir
    save(model, tmp_path / "no-tok")
    assert main(["generate", str(tmp_path / "no-tok"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err.lower() or "tokenizer.json" in err
    assert err.count("\n") == 1
    assert main(["generate", str(path), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2


def test_cli_refuses_a_model_without_an_lm_head_before_printing_anything(tiny_model_dir, tmp_path, capsys):
    from lmforge.io.checkpoints import save

    path, model, _ = tiny_model_dir
    files = tiny_tokenizer_files()
    for name, cfg in {"classifier": model.config.replace(head="classifier", num_labels=2),
                      "encoder": model.config.replace(causal=False, head="none")}.items():  # fmt: skip
        save(random_model(cfg), tmp_path / name, tokenizer_files=files)
        assert main(["generate", str(tmp_path / name), "--prompt", "the cat"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "generate needs a causal model with a language-model head" in err


def test_python_api_loads_the_tokenizer_with_the_model_and_writes_what_the_cli_writes(tiny_model_dir, capsys):
    import lmforge

    path, _, _ = tiny_model_dir
    model = lmforge.load(path)
    tok = model.tokenizer
    ids = lmforge.generate(model, torch.tensor([tok.encode("the cat")]), 8, greedy=True, eos_id=tok.eos_id)[0]
    new = ids[len(tok.encode("the cat")) :].tolist()
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    assert main(["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "8", "--greedy"]) == 0
    assert capsys.readouterr().out == "the cat" + tok.decode(new, skip_special_tokens=True) + "\n"
