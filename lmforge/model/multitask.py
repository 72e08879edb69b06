"""A multi-task model: one shared trunk, and per task a branch of its own transformer layers and a task head.

    input ids -> trunk (embeddings + the lower K layers, shared) -> branch t (D layers of its own, task t only)
              -> [final norm] -> head t (BERT: pooler + classifier on [CLS]; decoders: classifier on the last token)

Task t's path is exactly a (K + D)-layer Transformer with a classifier head, so `task_model(t)` returns it as an
ordinary lmforge Transformer (the same tensors), which exports to a standard HF sequence classifier with the same
logits. D = 0 is the plain-head model (MT-DNN's shared encoder with one head per task). Branch layers start as copies
of the checkpoint's layers K .. K+D-1 ("upper": the layers the trunk gave up, so MiniLM's top 2 layers become each
task's branch) or fresh ("fresh": GPT-2's initialisation). Only the batch's own task's branch runs, so a branch's
gradient comes from its own task's loss alone, while the trunk's comes from every task's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Block, Transformer, make_norm, sequence_logits


class Branch(nn.Module):
    """Task t's own layers, final norm (decoders), pooler (BERT) and classifier."""

    def __init__(self, cfg: ModelConfig, depth: int, num_labels: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(depth))
        self.norm = make_norm(cfg, cfg.hidden_size) if cfg.final_norm else None
        self.pooler = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.hidden_size)}) if cfg.pooler else None
        self.classifier = nn.Linear(cfg.hidden_size, num_labels, bias=cfg.classifier_bias)


class MultiTaskModel(nn.Module):
    """`model(input_ids, attention_mask, token_type_ids, task=i)` -> task i's logits (B, num_labels[i]).

    `config` is the (K + D)-layer path's config (a classifier of the first task's size): what the loop's FLOPs count
    and describe() read; every task's path costs the same bar its classifier's few outputs."""

    runs_part_per_batch = True  # only the batch's task's branch runs (DDP finds the unused parameters)

    def __init__(self, path_cfg: ModelConfig, trunk_layers: int, tasks: dict[str, int]):
        super().__init__()
        if not 1 <= trunk_layers <= path_cfg.num_layers:
            raise ValueError(f"trunk_layers {trunk_layers} outside 1..{path_cfg.num_layers}")
        self.config = path_cfg.replace(num_labels=next(iter(tasks.values())))
        self.task_names = list(tasks)
        self.num_labels = dict(tasks)
        # The trunk is a headless Transformer of K layers without the final norm (the branch ends with it).
        self.trunk = Transformer(path_cfg.replace(num_layers=trunk_layers, head="none", pooler=False, final_norm=False))
        depth = path_cfg.num_layers - trunk_layers
        self.branches = nn.ModuleList(Branch(path_cfg, depth, n) for n in tasks.values())

    @property
    def layers(self) -> nn.ModuleList:
        """Every block, trunk first (FSDP wraps and compiles block by block)."""
        return nn.ModuleList([*self.trunk.layers, *(b for br in self.branches for b in br.layers)])

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        task: int = 0,
    ) -> Tensor:
        trunk, branch, cfg = self.trunk, self.branches[task], self.config
        T = input_ids.shape[1]
        x = trunk(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)  # (B, T, C)
        rope = trunk.rope(torch.arange(T, device=input_ids.device), x.dtype)
        mask, is_causal = trunk._mask(T, 0, attention_mask, input_ids.device)
        for block in branch.layers:
            x = block(x, rope, mask, is_causal)
        if branch.norm is not None:
            x = branch.norm(x)
        return sequence_logits(x, input_ids, cfg.pad_token_id, branch.pooler, branch.classifier)  # (B, num_labels)

    def task_state(self, task: int) -> dict[str, Tensor]:
        """Task `task`'s path under a plain Transformer's names: embed.*, layers.0 .. layers.K+D-1, norm, pooler,
        classifier."""
        K = len(self.trunk.layers)
        state = dict(self.trunk.state_dict())  # embed.*, layers.0 .. layers.K-1
        for name, v in self.branches[task].state_dict().items():
            if name.startswith("layers."):
                i, rest = name[len("layers.") :].split(".", 1)
                name = f"layers.{K + int(i)}.{rest}"
            state[name] = v
        return state

    def task_model(self, task: int) -> Transformer:
        """Task `task`'s path as a standalone Transformer (copies of the tensors), its tokenizer attached."""
        cfg = self.config.replace(num_labels=self.num_labels[self.task_names[task]])
        model = Transformer(cfg)
        model.load_state_dict(self.task_state(task))
        model.tokenizer_files = getattr(self, "tokenizer_files", None)
        return model

    def export(self, directory) -> list[str]:
        """Every task's path as a standard HF sequence classifier in directory/<task> (transformers'
        AutoModelForSequenceClassification loads it with the same logits), and directory/multitask.json naming them."""
        import json
        from pathlib import Path

        from lmforge.io.atomic import atomic_write_bytes
        from lmforge.io.checkpoints import export_hf

        directory = Path(directory)
        for i, name in enumerate(self.task_names):
            export_hf(self.task_model(i), directory / name, overwrite=True)
        listing = {"tasks": self.task_names, "trunk_layers": len(self.trunk.layers), "num_labels": self.num_labels}
        atomic_write_bytes(directory / "multitask.json", (json.dumps(listing, indent=1) + "\n").encode())
        return self.task_names


def multitask_from_checkpoint(
    path: str, tasks: dict[str, int], trunk_layers: int, branch_layers: int, branch_init: str, seed: int
) -> MultiTaskModel:
    """The checkpoint's embeddings and lower `trunk_layers` layers (-1: all but the branches') as the trunk, and per
    task `branch_layers` layers
    (copies of its layers trunk_layers.. when branch_init is "upper", else fresh), its final norm and pooler
    (copied into every branch) and a fresh classifier of the task's size. The tokenizer travels along."""
    import sys

    from lmforge.data.tokenizer import Tokenizer
    from lmforge.errors import UserError
    from lmforge.io.checkpoints import read_checkpoint
    from lmforge.objectives.classify import classifier_config

    cfg, tensors, side = read_checkpoint(path)
    if "tokenizer.json" not in side:
        raise UserError(f"{path} carries no tokenizer.json: tasks are encoded with the model's own")
    L, D = cfg.num_layers, branch_layers
    K = trunk_layers if trunk_layers >= 0 else L - D
    if branch_init not in ("upper", "fresh"):
        raise UserError(f"multitask.branch_init must be upper or fresh, got {branch_init!r}")
    if K < 1:
        raise UserError(f"multitask.trunk_layers must be >= 1 (the layers every task shares), got {K}")
    if D < 0 or K > L or (branch_init == "upper" and K + D > L):
        raise UserError(
            f"multitask.trunk_layers {K} + branch_layers {D} do not fit {path}'s {L} layers"
            + (" (upper branches copy layers trunk_layers .. trunk_layers + branch_layers - 1)" if K <= L else "")
        )
    tok = Tokenizer.from_files(side)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    path_cfg = classifier_config(cfg, next(iter(tasks.values())), pad).replace(num_layers=K + D)
    if cfg.family != "bert" and path_cfg.pad_token_id is None:
        raise UserError(f"{path} names no pad token, which a decoder classifier needs to find each row's last token")
    model = MultiTaskModel(path_cfg, K, tasks)
    Transformer.init_weights(model, generator=torch.Generator().manual_seed(seed))  # the same scheme, every part
    own, copied = model.state_dict(), set()

    def put(name: str, t: Tensor) -> None:
        own[name].copy_(t)
        copied.add(name)

    with torch.no_grad():
        for name, t in tensors:
            if name.startswith("embed."):
                put(f"trunk.{name}", t)
            elif name.startswith("layers."):
                i, rest = name[len("layers.") :].split(".", 1)
                if int(i) < K:
                    put(f"trunk.layers.{i}.{rest}", t)
                elif branch_init == "upper" and int(i) < K + D:
                    for b in range(len(tasks)):
                        put(f"branches.{b}.layers.{int(i) - K}.{rest}", t)
            elif name.startswith(("norm.", "pooler.")):
                for b in range(len(tasks)):
                    if f"branches.{b}.{name}" in own:
                        put(f"branches.{b}.{name}", t)
    fresh = sorted({n.rsplit(".", 1)[0] for n in own if n not in copied and ".classifier." not in n})
    if fresh:
        print(f"lmforge: fresh {', '.join(fresh)} on {path}", file=sys.stderr)
    model.tokenizer_files = side
    return model
