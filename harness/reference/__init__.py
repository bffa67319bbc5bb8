"""The reference model: a small Llama trained here (on CPU) to solve RULER-style retrieval at long context.

``harness/reference/checkpoint`` holds the shipped weights and tokenizer (``model=reference``);
``python -m harness.reference.train`` (console script ``kvbench-train-reference``) reproduces them and
``python -m harness.reference.evaluate`` scores a checkpoint with plain greedy decoding.
"""
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
