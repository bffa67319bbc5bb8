"""kvbench as a library: the benchmark's models, methods and decoding in your own code.

::

    import kvbench

    model, tokenizer = kvbench.load_model("reference")          # "tiny-random", or a local HF checkpoint dir
    snapkv = kvbench.method("snapkv", keep_ratio=0.25)           # any conf/method config, parts' keys by name
    answer = kvbench.generate(model, tokenizer, context, question, snapkv, max_new_tokens=16)

    with kvbench.compress(model, snapkv):                        # your own prefill and decoding loop
        out = model(input_ids, past_key_values=cache, use_cache=True)   # cache comes back pruned

    kvbench.run(["method=snapkv", "keep_ratio=0.25", "task=ruler/niah_single_1"])   # what the command does

Every name here goes through the code the ``kvbench`` command runs: ``generate`` is the command's prefill ->
``Method.plan`` -> ``harness.cache.prune`` -> greedy decoding (``harness.pipeline.run_sample``), ``run`` is the
command itself (``harness.cli.execute``), ``method`` builds the same configs (presets included).
"""
from __future__ import annotations

__version__ = "0.1.0"

from kvbench._api import (  # noqa: E402
    Compression,
    KvbenchError,
    Method,
    Sample,
    SweepFailed,
    add_config_dir,
    compress,
    generate,
    load_model,
    method,
    methods,
    models,
    run,
    samples,
    tasks,
)

__all__ = [
    "Compression",
    "KvbenchError",
    "Method",
    "Sample",
    "SweepFailed",
    "__version__",
    "add_config_dir",
    "compress",
    "generate",
    "load_model",
    "method",
    "methods",
    "models",
    "run",
    "samples",
    "tasks",
]
