"""`lmforge shrink TEACHER --out DST --method merge-groups|every-other`: a shallower student from a teacher's layers.

merge-groups (Huang et al. 2023): each group of --group consecutive layers becomes one layer whose attention is
copied from one layer of the group and frozen during distillation, and whose feed-forward part starts from another
and is distilled against the group's output. every-other (DistilBERT / PKD): --layers evenly spaced layers kept.
Writes DST in HF form (transformers loads it); prints one JSON line with the layer map and the frozen parameters,
and the `kd` recipe lines that distil it with `lmforge finetune`.
"""

from __future__ import annotations

import argparse
import json

from lmforge.errors import UserError
from lmforge.io.atomic import refuse_output_over_input


def register(sub) -> None:
    p = sub.add_parser(
        "shrink",
        help="make a shallower student from a teacher's layers (merged groups or every other layer)",
        description="Write DST: TEACHER with fewer layers, for knowledge distillation (`lmforge finetune` with a kd "
        "section). Prints one JSON line: the layer map (student layer -> teacher layer of its feature target) and the "
        "parameters to freeze.",
    )
    p.add_argument("teacher", help="checkpoint (HF folder, lmforge folder or .gguf)")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--method", choices=("merge-groups", "every-other"), default="merge-groups")
    p.add_argument("--group", type=int, default=2, help="merge-groups: layers per group (default 2)")
    p.add_argument("--attention-from", type=int, default=0, help="merge-groups: its layer whose attention stays (0)")
    p.add_argument("--ffn-from", type=int, help="merge-groups: the group layer whose feed-forward part starts (last)")
    p.add_argument("--layers", type=int, help="every-other: layers kept")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.io.checkpoints import read_checkpoint
    from lmforge.io.hf_tensors import save_hf
    from lmforge.surgery.shrink import encoder_params, every_other, merge_groups

    refuse_output_over_input(args.teacher, args.out)
    cfg, tensors, side = read_checkpoint(args.teacher)
    state = dict(tensors)
    if args.method == "merge-groups":
        tgt, out, report = merge_groups(cfg, state, args.group, args.attention_from, args.ffn_from)
    else:
        if args.layers is None:
            raise UserError("--method every-other needs --layers")
        tgt, out, report = every_other(cfg, state, args.layers)
    save_hf(tgt, out.items(), args.out, side, overwrite=args.overwrite)
    report |= {"encoder_params": encoder_params(tgt), "teacher_encoder_params": encoder_params(cfg)}
    freeze = sorted({".".join(["layers", "*", *name.split(".")[2:]]) for name in report["frozen"]})
    print(f"kd section: layer_map: {report['layer_map']}" + (f", freeze: {freeze}" if freeze else ""))
    print(json.dumps(report | {"freeze_patterns": freeze}))
    return 0
