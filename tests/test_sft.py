"""Trace-supervised fine-tuning: packing computes what each example computes alone, masks are exact and checked,
span losses weigh what they say, generations are scored as documented, splits are stable, and `lmforge sft` trains,
resumes, self-trains and exports through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, segment_positions
from lmforge.objectives.trace_sft import SpanWeights, span_losses
from lmforge.tasks.traces import TraceExample, score_generation, trace_splits
from lmforge.train.recipe import TrainConfig
from lmforge.train.trace_task import (
    QUERY,
    RESPONSE,
    TRACE,
    TraceSequences,
    TraceTemplate,
    char_tokenizer_files,
    collate,
)

EX = TraceExample("12+34=", ("2+4+0=6", "1+3+0=4"), "46")


def chars() -> dict[str, bytes]:
    return char_tokenizer_files(["0123456789+=*,writecarysum# \n"])


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_packed_examples_compute_what_each_computes_alone(position):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_seq_len=32,
                      position=position)  # fmt: skip
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    m.init_weights()
    a, b = torch.randint(0, 40, (1, 7)), torch.randint(0, 40, (1, 5))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)  # two examples and 3 padding tokens
    segments = torch.tensor([[0] * 7 + [1] * 5 + [2] * 3])
    assert segment_positions(segments).tolist() == [[*range(7), *range(5), *range(3)]]
    with torch.no_grad():
        together = m(packed, segment_ids=segments)
        torch.testing.assert_close(together[:, :7], m(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 7:12], m(b), atol=1e-5, rtol=1e-5)


def test_spans_cover_query_trace_response_and_labels_stop_at_example_boundaries():
    template = TraceTemplate(chars(), "plain")
    ids, spans = template.encode(EX, with_trace=True)
    tok = template.tok
    assert tok.decode(ids) == "12+34=\n" + "".join(s + "\n" for s in EX.trace) + "#### 46<|endoftext|>"
    n_query = len("12+34=\n")
    assert spans[:n_query] == [QUERY] * n_query and spans[-1] == RESPONSE
    assert spans.count(RESPONSE) == len("#### 46") + 1  # the end-of-text token is the response's
    assert spans.count(TRACE) == sum(len(s) + 1 for s in EX.trace)
    answer_only, only_spans = template.encode(EX, with_trace=False)
    assert TRACE not in only_spans and tok.decode(answer_only) == "12+34=\n#### 46<|endoftext|>"

    batch = collate([[(ids, spans), (answer_only, only_spans)]], pad_id=0)
    n = len(ids)
    assert batch["labels"][0, n - 1] == -100  # no target across the boundary into the next example
    assert batch["labels"][0, : n - 1].tolist() == ids[1:]
    assert batch["spans"][0, : n - 1].tolist() == spans[1:]
    assert batch["segment_ids"][0].tolist() == [0] * n + [1] * len(answer_only)


def test_an_example_that_does_not_fit_is_an_error_naming_it_and_so_is_a_short_epoch():
    tc = TrainConfig(seq_len=20, batch_size=2)
    splits = {"train": [EX, EX], "validation": [EX], "test": []}
    with pytest.raises(UserError, match=r"train example 0 .*more than train.seq_len 20: its response would be cut"):
        TraceSequences(splits, TraceTemplate(chars(), "plain"), tc, True, True, chars())
    task = TraceSequences(splits, TraceTemplate(chars(), "plain"), TrainConfig(seq_len=20, batch_size=2), False,
                          True, chars())  # fmt: skip  # answer-only fits in 20 tokens, one example a row
    assert task.next_batch()["input_ids"].shape[0] == 2
    with pytest.raises(UserError, match="fill 2 rows .* fewer than train.batch_size 4"):
        TraceSequences(splits, TraceTemplate(chars(), "plain"), TrainConfig(seq_len=20, batch_size=4), False, True,
                       chars())  # fmt: skip


def test_batch_k_is_the_same_whether_drawn_in_order_or_after_a_resume():
    splits = trace_splits("addition:2", {"train": 30, "validation": 2, "test": 0}, seed=0)
    make = lambda: TraceSequences(splits, TraceTemplate(chars(), "plain"), TrainConfig(seq_len=48, batch_size=2),  # noqa: E731
                                  True, True, chars())  # fmt: skip
    task = make()
    drawn = [task.next_batch()["input_ids"] for _ in range(40)]  # several packed epochs
    assert len(task._epoch_sizes) > 2
    later = make()
    later.load_state_dict(task.state_dict() | {"batches_drawn": 25})
    assert torch.equal(later.next_batch()["input_ids"], drawn[25])


def test_chat_template_frames_the_query_as_user_and_the_completion_as_assistant():
    files = char_tokenizer_files(["0123456789+=,writecaryusn#<>/ \n"])
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    files["tokenizer_config.json"] = json.dumps(config).encode()
    template = TraceTemplate(files, "auto")
    assert template.kind == "chat"
    ids, spans = template.encode(EX, with_trace=True)
    text = template.tok.decode(ids)
    assert text == "<user>12+34=</>\n<assistant>" + "".join(s + "\n" for s in EX.trace) + "#### 46</>\n"
    prompt = template.prompt_ids(EX)
    assert ids[: len(prompt)] == prompt and set(spans[: len(prompt)]) == {QUERY}
    assert spans[-1] == RESPONSE  # the end-of-turn marker belongs to the response


def test_span_losses_weigh_each_span_as_configured():
    logits = torch.zeros(1, 4, 3)
    logits[0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # per-token losses differ
    labels = torch.tensor([[0, 0, 0, -100]])
    spans = torch.tensor([[QUERY, TRACE, RESPONSE, -1]])
    ce = [math.log(math.exp(x) + 2) - x for x in (0.0, 1.0, 2.0)]
    loss, _ = span_losses(logits, labels, spans, SpanWeights(0.0, 1.0, 1.0).tensor())
    assert loss.item() == pytest.approx((ce[1] + ce[2]) / 2, rel=1e-6)
    loss, _ = span_losses(logits, labels, spans, SpanWeights(0.5, 2.0, 1.0).tensor())
    assert loss.item() == pytest.approx((0.5 * ce[0] + 2 * ce[1] + ce[2]) / 3.5, rel=1e-6)


def test_generations_are_scored_as_documented():
    right = "2+4+0=6\n1+3+0=4\n#### 46"
    assert score_generation(EX, right) == {"answer": 1.0, "answered": 1.0, "trace_values": 1.0, "trace_similarity": 1.0}
    no_answer = score_generation(EX, "2+4+0=6\n1+3+0=4\n")
    assert no_answer["answer"] == 0.0 and no_answer["answered"] == 0.0 and no_answer["trace_values"] == 1.0
    wrong_step = score_generation(EX, "2+4+0=7\n1+3+0=4\n#### 47")
    assert wrong_step["answer"] == 0.0 and wrong_step["trace_values"] == pytest.approx(7 / 8)  # 8 numbers, 1 wrong
    assert score_generation(EX, "#### 46.0")["answer"] == 1.0  # a number is compared as a number


def test_splits_are_disjoint_and_a_smaller_training_set_is_a_prefix_of_a_larger():
    small = trace_splits("addition:3", {"train": 50, "validation": 20, "test": 30}, seed=0)
    large = trace_splits("addition:3", {"train": 200, "validation": 20, "test": 30}, seed=0)
    assert small["test"] == large["test"] and small["validation"] == large["validation"]
    assert large["train"][:50] == small["train"]
    queries = [{e.query for e in large[s]} for s in ("train", "validation", "test")]
    assert sum(map(len, queries)) == 250 and not (queries[0] & queries[1] or queries[0] & queries[2])
    ex = large["train"][0]
    a, b = (int(x) for x in ex.query.rstrip("=").split("+"))
    assert ex.response == str(a + b) and len(ex.trace) == 3
    mul = trace_splits("multiplication:3x2", {"train": 5, "validation": 1, "test": 1}, seed=1)["train"][0]
    a, b = (int(x) for x in mul.query.rstrip("=").split("*"))
    assert mul.response == str(a * b) and mul.trace[-1].endswith(f"sum {a * b}")
    with pytest.raises(UserError, match="distinct problems"):
        trace_splits("addition:1", {"train": 200, "validation": 1, "test": 1}, seed=0)


def sft_recipe(tmp_path, **sft) -> str:
    recipe = {
        "model": {"vocab_size": 48, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_size": 64,
                  "max_seq_len": 128},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "seq_len": 128, "eval_every": 3, "log_every": 1,
                  "out_dir": str(tmp_path / "run"), "sample_prompts": [], "precision": "float32"},
        "sft": {"data": "addition:2", "train_examples": 40, "val_examples": 8, "test_examples": 8,
                "tokenizer": "chars", "max_new_tokens": 40, **sft},
    }  # fmt: skip
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_sft_trains_logs_span_losses_and_generation_scores_and_resumes_exactly(tmp_path, capsys):
    r = sft_recipe(tmp_path)
    assert main(["sft", r, "--train.ckpt_every=3", "--train.eval_test=true"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("val_answer_acc", "val_answered", "val_trace_values", "val_loss_trace", "test_answer_acc"):
        assert 0 <= out[key] < 10, key
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("loss") is not None]
    assert len(steps) == 6 and all("loss_trace" in r and "loss_response" in r for r in steps)
    full = [r["loss"] for r in steps]
    # a second run that "dies" after a checkpoint at step 3, then resumes: the same losses after it
    from lmforge.commands.sft import load_sft_recipe, sft_trainer
    from lmforge.tasks.traces import trace_splits

    recipe, extra = load_sft_recipe(r, ["--train.ckpt_every=3", "--train.eval_test=true",
                                        f"--train.out_dir={tmp_path / 'again'}"])  # fmt: skip
    sc = extra["sft"]
    splits = trace_splits(sc.data, {"train": 40, "validation": 8, "test": 8}, sc.data_seed)
    t = sft_trainer(recipe, sc, splits)
    t.validate()
    for _ in range(3):
        t.train_step()
    t.save()
    del t
    sft_trainer(recipe, sc, splits, resume=True).run()
    again = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if r.get("loss") is not None][-3:] == pytest.approx(full[-3:], abs=1e-6)


def test_self_training_round_samples_every_query_and_charges_its_generation(tmp_path, capsys):
    r = sft_recipe(tmp_path, self_train_rounds=1, self_train_steps=2, self_train_samples=2, self_train_min_trace=0.0)
    assert main(["sft", r]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stats = json.loads((tmp_path / "run" / "round1" / "self_train.json").read_text())
    assert stats["sampled"] == 80 and 0 <= stats["kept"] <= 80 and stats["generation_flops"] > 0
    assert [s["stage"] for s in out["stages"]] == ["sft", "round1"] and out["stages"][1]["steps"] == 2
    assert out["flops_total"] == pytest.approx(sum(s["flops"] for s in out["stages"]) + stats["generation_flops"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "round1" / "final")
    assert hf.config.eos_token_id == 0  # the char tokenizer's end-of-text: generation stops there


def test_bad_sft_inputs_exit_2(tmp_path, capsys):
    assert main(["sft", sft_recipe(tmp_path, data="addition:x")]) == 2
    assert main(["sft", sft_recipe(tmp_path, tokenizer="")]) == 2  # a fresh model needs a tokenizer
    assert main(["sft", sft_recipe(tmp_path, data=str(tmp_path / "none.jsonl"))]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "1+1="}\n')
    assert main(["sft", sft_recipe(tmp_path, data=str(bad))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("lmforge: error:") for line in err), err
    assert "bad.jsonl:1" in err[-1]
