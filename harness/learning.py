"""The learned-method contract: what ``kvbench-train`` (harness/train.py) asks of a learner, and the registry
it finds one in by the method's name.

A learned method (``methods/lkv.py``, ``methods/spkv.py``) registers its learner class here, as it registers its
scorer and allocator in ``harness.compress``::

    @register_learner("lkv")
    class LKVLearner(Learner):
        ...

``kvbench-train method=<name>`` loads every method module (``methods.load_all``) and trains
``LEARNERS[<name>]``; it imports no concrete method. A learner is built as ``cls(model, method_cfg, hp,
seed=...)`` (``method_cfg``: the method config as plain values; ``hp``: the ``<name>:`` section of
conf/train.yaml) and is asked for what ``Learner`` below lists.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from harness.compress import registrar

LEARNERS: dict[str, type] = {}
register_learner = registrar(LEARNERS)  # ``@register_learner(name)``: the learner of method ``name``


class Learner:
    """What kvbench-train uses of a learner (subclasses implement the methods and set the attributes)."""

    registered_name = ""  # the method it trains (set by ``register_learner``)
    needs_hidden = False  # True: the trainer's full-cache prefill stores each layer's input hidden states
    default_lr = 1e-3  # the learning rate when the train config sets none

    def trainable(self) -> list[nn.Parameter]:  # pragma: no cover - interface
        """The parameters the optimizer updates."""
        raise NotImplementedError

    def student_logits(self, model: nn.Module, modules: list[nn.Module], batch: Any, keep_ratio: float,
                       gen) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:  # pragma: no cover - interface
        """``(logits, aux, stats)`` of one training step: the student's logits over ``batch.qa_ids`` (the question
        + target after the context, as harness/train.py's ``Batch``), auxiliary loss terms added to the loss,
        and numbers to log."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        """The tensors a checkpoint stores (``params.safetensors``)."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, Tensor]) -> None:  # pragma: no cover - interface
        """Continue from a checkpoint's tensors (a resumed run)."""
        raise NotImplementedError

    def checkpoint_hparams(self, method_cfg: dict) -> dict:  # pragma: no cover - interface
        """The hyper-parameters config.json records (what the method's scorer reads back)."""
        raise NotImplementedError
