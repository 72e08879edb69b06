"""The self-training round of trace-supervised fine-tuning: the model's own traces, kept by their scores, trained on.

For every training query the model samples `samples` completions (at `temperature`); each is scored against the
truth (tasks/traces.py) and kept when its answer is right AND its trace scores at least `min_trace` (the fraction of
the true trace's numbers at their place). The next round trains on the original examples plus the kept traces (as
in rejection-sampling fine-tuning; STaR keeps only the generated ones). The generation's FLOPs (forward passes over
prompt and written tokens) are counted, so the round's cost is charged in full.
"""

from __future__ import annotations

import torch

from lmforge.metrics.flops import flops_per_token
from lmforge.objectives.trace_sft import write_completions
from lmforge.tasks.traces import TraceExample, parse_generation, score_generation
from lmforge.train.trace_task import TraceTemplate, by_prompt_length


@torch.no_grad()
def sample_kept_traces(
    model,
    template: TraceTemplate,
    examples: list[TraceExample],
    samples: int,
    temperature: float,
    min_trace: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
) -> tuple[list[TraceExample], dict]:
    """(kept examples, stats): stats count the samples, the kept ones, their answer accuracy, the generation FLOPs."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [template.prompt_ids(ex) for ex in examples]
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    kept, n, right, flops = [], 0, 0, 0.0
    for idx in by_prompt_length(order, lengths, batch_size):
        part = [i for i in idx for _ in range(samples)]
        ids = torch.tensor([prompts[i] for i in part], dtype=torch.long)
        new = write_completions(model, ids, max_new_tokens, template.eos_id, temperature, gen)
        # The batch decodes in lockstep until its longest row ends (its end token included): every row pays for the
        # prompt and that many steps, a forward pass each, at about the final length's attention cost.
        steps = min(max_new_tokens, int((new >= 0).sum(1).max()) + 1)
        T = lengths[idx[0]] + steps
        flops += len(part) * T * flops_per_token(model.config, T)["forward"]
        for i, row in zip(part, new.tolist()):
            text = template.tok.decode([t for t in row if t >= 0], skip_special_tokens=True)
            score = score_generation(examples[i], text)
            n += 1
            right += int(score["answer"])
            if score["answer"] == 1.0 and score["trace_values"] >= min_trace:
                trace, _ = parse_generation(text)
                kept.append(TraceExample(examples[i].query, tuple(trace), examples[i].response))
    stats = {"sampled": n, "kept": len(kept), "sample_answer_acc": right / max(n, 1), "generation_flops": flops}
    return kept, stats
