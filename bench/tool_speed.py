"""`lmforge data` tokenizing and `lmforge generate` decoding against the obvious baselines, side by side.

    python bench/tool_speed.py --out bench/results/NAME [--tokenizer runs/data/starter3-bpe4096/tokenizer.json]
                               [--model pkg:smollm2-135m] [--rounds 3] [--new-tokens 64]

1. Tokenizing: the starter corpus (every document, as `lmforge data --starter` collects it) encoded and written by
   lmforge's data builder (parallel chunks of encode_batch, eos appended, shards written) against `tokenizers`' own
   `Tokenizer.encode_batch` over the same texts with the same tokenizer.json (nothing written). Ratio: lmforge
   seconds / tokenizers seconds, median of per-round ratios, rounds alternating.
2. Generation: greedy decoding of --new-tokens tokens (eos ignored) from one prompt with lmforge's KV-cache decoder
   (`lmforge generate`'s path) against transformers' `generate` with its cache (use_cache, min_new_tokens = max),
   on the same float32 weights (lmforge's HF export of --model). Tokens/s counts the new tokens over the whole call,
   prefill included; the two outputs must be the same tokens.
Writes OUT/result.json; the last line printed is the summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import provenance, write_result  # noqa: E402

PROMPT = "The history of the English language begins"


def tokenizing(tokenizer: str, rounds: int) -> dict:
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.data import corpus, tokenizer_build
    from lmforge.data.tokens import TokenShardWriter, _tokenize_split, dtype_for_vocab

    _, docs = corpus.collect_documents(True, [])
    texts = [d.text for d in docs]
    tok = tokenizer_build.resolve_tokenizer(tokenizer, [])
    hf = HFTokenizer.from_file(tokenizer)
    times: dict[str, list[float]] = {"lmforge": [], "tokenizers": []}
    tokens = {}
    for r in range(rounds):
        for side in ("lmforge", "tokenizers") if r % 2 == 0 else ("tokenizers", "lmforge"):
            t0 = time.perf_counter()
            if side == "lmforge":
                with tempfile.TemporaryDirectory() as tmp:
                    writer = TokenShardWriter(Path(tmp), "train", dtype_for_vocab(tok.vocab_size), None)
                    counts = _tokenize_split(tok, texts, writer, "tokenizing")
                    writer.finish()
                tokens[side] = int(counts.sum()) - len(texts)  # without the eos after each document
            else:
                tokens[side] = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
            times[side].append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(times["lmforge"], times["tokenizers"]))
    return {
        "documents": len(texts),
        "characters": sum(len(t) for t in texts),
        "tokens": tokens,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "lmforge_over_tokenizers": round(ratio, 3),
    }


def generation(model_path: str, rounds: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lmforge.data.tokenizer import Tokenizer
    from lmforge.io.checkpoints import export_hf, load
    from lmforge.model.generate import generate

    model = load(model_path, dtype=torch.float32)
    ids = torch.tensor([Tokenizer.from_files(model.tokenizer_files).encode(PROMPT)])
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    kw |= dict(pad_token_id=0, temperature=None, top_p=None, top_k=None)
    outs: dict[str, list[int]] = {}
    rates: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        for side in ("lmforge", "transformers") if r % 2 == 0 else ("transformers", "lmforge"):
            t0 = time.perf_counter()
            if side == "lmforge":
                out = generate(model, ids, new_tokens, greedy=True)
            else:
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            seconds = time.perf_counter() - t0
            outs[side] = out[0, ids.shape[1] :].tolist()
            if r:
                rates[side].append(new_tokens / seconds)
    ratio = statistics.median(a / b for a, b in zip(rates["lmforge"], rates["transformers"]))
    return {
        "model": model_path,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "tokens_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "lmforge_over_transformers": round(ratio, 3),
        "same_tokens": outs["lmforge"] == outs["transformers"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", default="runs/data/starter3-bpe4096/tokenizer.json")
    p.add_argument("--model", default="pkg:smollm2-135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    if not Path(a.tokenizer).is_file():
        p.error(f"--tokenizer {a.tokenizer}: no such file (build it with lmforge data)")
    torch.manual_seed(0)
    result = {
        "provenance": provenance(argv),
        "threads": torch.get_num_threads(),
        "tokenizing": tokenizing(a.tokenizer, a.rounds),
        "generation": generation(a.model, a.rounds, a.new_tokens),
    }
    write_result(a.out / "result.json", result)
    summary = {
        "data_over_tokenizers": result["tokenizing"]["lmforge_over_tokenizers"],
        "generate_over_transformers": result["generation"]["lmforge_over_transformers"],
        "same_tokens": result["generation"]["same_tokens"],
    }
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
