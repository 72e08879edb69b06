"""PSP++ co-training: the main model's LM loss plus the held-out heads' own LM loss (model/heldout.py).

    loss = main LM loss + heldout.loss_weight * held-out LM loss

The model detaches what crosses between the two parameter sets, so the sum's gradient is each set's own loss's:
held-out parameters learn only from the held-out loss, main parameters only from the main loss (tested). With
loss_weight 0 and model.heldout_detach false, the held-out heads are trained by the main loss alone: the
parameter-matched control of the experiment. Logged: main_loss and heldout_loss per step; val_loss (the main
model's, comparable with any other run) and val_heldout_loss per evaluation. FLOPs count both models.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.objectives.base import Objective
from lmforge.objectives.lm import lm_loss


@dataclass(frozen=True)
class HeldOutConfig:
    loss_weight: float = 1.0  # the held-out LM loss's weight (0: the held-out heads learn from the main loss only)


class HeldOutLanguageModelling(Objective):
    def __init__(self, config: HeldOutConfig):
        super().__init__()
        if not config.loss_weight >= 0:
            raise UserError(f"heldout.loss_weight must be >= 0, got {config.loss_weight}")
        self.weight = config.loss_weight

    def _losses(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits, states = model(batch["input_ids"], return_states=True)
        if "heldout_logits" not in states:
            raise UserError("the heldout objective needs a model with held-out heads (model.heldout_layers > 0)")
        return lm_loss(logits, batch["labels"]), lm_loss(states["heldout_logits"], batch["labels"])

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        main, held = self._losses(model, batch)
        return main + self.weight * held, {"main_loss": main.detach(), "heldout_loss": held.detach()}

    def val_metrics(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        main, held = self._losses(model, batch)
        return {"val_loss": main, "val_heldout_loss": held}
