"""InfiniteBench (Zhang et al., ACL 2024, "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens"): 12 tasks.

Registers ``infinitebench/<task>`` (suite "infinitebench") for the official files' names: passkey, number_string,
kv_retrieval, longdialogue_qa_eng, longbook_sum_eng, longbook_choice_eng, longbook_qa_eng, longbook_qa_chn,
math_find, math_calc, code_run, code_debug. Everything follows OpenBMB/InfiniteBench (config.py names the commit):
records ``<task.data_dir>/<task>.jsonl`` as on the Hugging Face dataset (data.py), the official prompt templates of
a model family split into context and question (prompt.py, task parameter ``prompt_family``), the open models'
middle truncation (prompt.py), the per-task scores of src/compute_scores.py (metrics.py). passkey, number_string and
kv_retrieval are also generated offline at any length when no file is given (synthetic.py). docs/infinitebench.md
has every deviation from the official code.

Use from other code::

    from tasks.infinitebench import make_task
    task = make_task("infinitebench/code_debug", data_dir="/path/to/InfiniteBench", prompt_family="yarn_mistral")
    samples = task.samples(encoder, context_length, n_samples, seed)
    task.score(prediction, sample)                      # = tasks.infinitebench.metrics.score(task, pred, answers)
"""
from __future__ import annotations

from tasks import register
from tasks.infinitebench.config import PROMPT_FAMILIES, SYNTHETIC, TASKS, TEMPLATES
from tasks.infinitebench.metrics import score
from tasks.infinitebench.prompt import official_prompt, prompt_parts, truncate
from tasks.infinitebench.synthetic import GeneratedTask, generated_class
from tasks.infinitebench.task import SUITE, InfiniteBenchTask, task_class

_GENERATED = {t: generated_class(t) for t in SYNTHETIC}


def make_task(name: str, **kwargs):
    """'infinitebench/passkey' or 'passkey': the generated class for the three synthetic tasks (it reads the official
    file when ``data_dir`` holds it), the file-based class for the others."""
    task = name.removeprefix(f"{SUITE}/")
    if task in _GENERATED:
        return _GENERATED[task](**kwargs)
    return task_class(task)(**kwargs)


def _factory(task: str):
    def factory(**kwargs):
        return make_task(task, **kwargs)

    factory.__name__ = f"infinitebench_{task}"
    return factory


for _t in TASKS:
    register(f"{SUITE}/{_t}", suite=SUITE)(_factory(_t))

__all__ = ["make_task", "InfiniteBenchTask", "GeneratedTask", "task_class", "TASKS", "SYNTHETIC", "PROMPT_FAMILIES",
           "TEMPLATES", "score", "official_prompt", "prompt_parts", "truncate"]
