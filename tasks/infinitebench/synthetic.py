"""passkey, number_string and kv_retrieval generated offline at any length, as the official data was made.

Source: OpenBMB/InfiniteBench at 88b3daa, data/construct_synthetic_dataset.py (``build_passkey``,
``build_number_string``, ``build_kv_retrieval``); the official files were made by it at 128k tokens:

- passkey: the document is ``noise * j + needle + noise * (N - j)`` with the noise line "The grass is green. The sky
  is blue. The sun is yellow. Here we go. There and back again.\\n" and the needle "The pass key is {key}. Remember
  it. {key} is the pass key.\\n"; the key is 5 digits, each ``randint(0, 9)``; the question "What is the pass key?".
- number_string: the same with the needle "The sequence of digits is {key}. Remember it. {key} is the sequence of
  digits.\\n" and a 10-digit key: 5 random digits, then 5 times ``keys.insert(pos, keys[pos])`` at
  ``pos = randint(0, 5 + k - 1)``; the question "What is the sequence of digits?".
- kv_retrieval: ``JSON data:\\n{"<key>": "<value>", ...}`` of uuid4 keys and values (lost-in-the-middle's
  make_kv_retrieval_data.py, which the official file was made from), the queried pair among them; the input
  ``\\nKey: "<key>"\\nThe value associated with the specified key is: ``.

The official files sweep the needle's depth (``j`` over a grid from 0 to N; kv_retrieval's queried pair index over
the records); a generated sample draws its depth uniformly in [0, 100] %, or takes the task's ``depth``. The
haystack size (noise lines, pairs) is fitted by kvbench's fill rule (``LengthFittedTask``): the whole prompt, the
family's template included, fills 95-100 % of ``context_length``. ``meta["depth"]`` is the needle's depth in
percent, ``meta["evidence"]`` the character spans of the answer in ``context``, ``meta["needle_spans"]`` those
of the needle sentence (or pair), ``meta["generated"]`` True. When ``task.data_dir`` holds ``<task>.jsonl``
the official file is read instead (``tasks.infinitebench.task``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.errors import KvbenchError
from tasks.base import LengthFittedTask, PromptEncoder, Sample
from tasks.infinitebench import metrics
from tasks.infinitebench.config import DEFAULT_PROMPT_FAMILY, MAX_NEW_TOKENS
from tasks.infinitebench.prompt import prompt_parts
from tasks.infinitebench.task import SUITE, check_family, task_class, task_info
from tasks.ruler.common import TextBuilder, depth_percent, make_sample, random_uuid, rng_for

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = {
    "passkey": "The pass key is {key}. Remember it. {key} is the pass key.\n",
    "number_string": "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
}
QUESTION = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?"}
KV_HEAD = "JSON data:\n{"
KV_INPUT = '\nKey: "{key}"\nThe value associated with the specified key is: '


def passkey_digits(rng) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def number_string_digits(rng) -> str:
    keys = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        pos = rng.randint(0, 5 + k - 1)
        keys.insert(pos, keys[pos])
    return "".join(keys)


class GeneratedTask(LengthFittedTask):
    """passkey, number_string or kv_retrieval (``short_name``): generated at ``context_length`` unless
    ``task.data_dir`` holds the official ``<task>.jsonl`` (then its records, truncated as the official scripts)."""

    suite = SUITE
    reads_data = True  # the official file, when data_dir holds it
    n_min = 1

    def __init__(self, data_dir: str | None = None, prompt_family: str = DEFAULT_PROMPT_FAMILY,
                 depth: float | None = None, **params: Any):
        super().__init__(data_dir=data_dir)
        if params:
            raise KvbenchError(f"{self.name}: unknown task option(s) {', '.join(sorted(params))}; allowed: data_dir, "
                               "prompt_family, depth")
        self.prompt_family = check_family(self.name, self.short_name, prompt_family)
        if depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
                raise KvbenchError(f"{self.name}: depth={depth!r} must be a number within 0..100 (percent) or null "
                                   "(a random depth per sample)")
            depth = int(depth) if float(depth).is_integer() else float(depth)
        self.depth = depth
        self.max_new_tokens = MAX_NEW_TOKENS[self.short_name]
        self.info = task_info(self.short_name)
        file = Path(str(data_dir)).expanduser() / f"{self.short_name}.jsonl" if data_dir is not None else None
        self.file_task = None
        if file is not None and file.is_file():
            if depth is not None:
                raise KvbenchError(f"{self.name}: depth={depth} is for generated samples, but task.data_dir holds "
                                   f"{file.name}, whose records are used as they are; drop depth or task.data_dir")
            self.file_task = task_class(self.short_name)(data_dir=data_dir, prompt_family=self.prompt_family)
            self.finite = True  # every record of the file with n_samples=null

    # -- the official file, when given -----------------------------------------------------------------------
    def samples(self, encoder: PromptEncoder, context_length: int, n_samples: int | None, seed: int) -> list[Sample]:
        if self.file_task is not None:
            return self.file_task.samples(encoder, context_length, n_samples, seed)
        return super().samples(encoder, context_length, n_samples, seed)

    def question_samples(self, encoder: PromptEncoder, context_length: int, n_contexts: int | None,
                         questions: int, seed: int) -> list[Sample]:
        if self.file_task is not None:
            return self.file_task.question_samples(encoder, context_length, n_contexts, questions, seed)
        return super().question_samples(encoder, context_length, n_contexts, questions, seed)

    def score(self, prediction: str, sample: Sample) -> float:
        return metrics.score(self.short_name, prediction, sample.answers)

    # -- generation ------------------------------------------------------------------------------------------
    def _depth(self, rng) -> float:
        return float(self.depth) if self.depth is not None else rng.uniform(0, 100)

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        rng = rng_for(*key)  # the needle and its depth do not depend on the haystack size
        if self.short_name == "kv_retrieval":
            body, question, answer, at, total = self._kv_body(rng, key, n)
        else:
            body, question, answer, at, total = self._needle_body(rng, n)
        parts = prompt_parts(self.prompt_family, self.short_name, {"context": body.text(), "input": question})
        meta = {"task": self.short_name, "prompt_family": self.prompt_family, "generated": True,
                "depth": self.depth if self.depth is not None else depth_percent(at, total)}
        answers = metrics.answers_of(self.short_name, answer)
        return make_sample(parts.head, body, parts.tail, parts.answer_prefix, answers, self.max_new_tokens, meta)

    def _needle_body(self, rng, n: int) -> tuple[TextBuilder, str, str, int, int]:
        """``noise * j + needle + noise * (n - j)``, ``j = round(n * depth / 100)``."""
        digits = passkey_digits(rng) if self.short_name == "passkey" else number_string_digits(rng)
        j = round(n * self._depth(rng) / 100)
        needle = NEEDLE[self.short_name].format(key=digits)
        first = needle.index(digits)
        second = needle.index(digits, first + len(digits))
        body = TextBuilder()
        body.add(NOISE * j)
        body.add(needle, ("needle_spans", 0, len(needle) - 1), ("evidence", first, first + len(digits)),
                 ("evidence", second, second + len(digits)))
        body.add(NOISE * (n - j))
        return body, QUESTION[self.short_name], digits, j, n

    def _kv_body(self, rng, key: tuple, n: int) -> tuple[TextBuilder, str, str, int, int]:
        """``n`` uuid pairs, the queried one at ``round((n - 1) * depth / 100)``."""
        query_key, query_value = random_uuid(rng), random_uuid(rng)
        at = round((n - 1) * self._depth(rng) / 100)
        noise = rng_for(*key, "haystack", n)  # the other pairs depend on the size
        body = TextBuilder()
        body.add(KV_HEAD)
        for i in range(n):
            if i:
                body.add(", ")
            if i == at:
                pair = f'"{query_key}": "{query_value}"'
                start = len(query_key) + 5
                body.add(pair, "needle_spans", ("evidence", start, start + len(query_value)))
            else:
                body.add(f'"{random_uuid(noise)}": "{random_uuid(noise)}"')
        body.add("}")
        return body, KV_INPUT.format(key=query_key), query_value, at, max(n - 1, 1)


def generated_class(task: str) -> type[GeneratedTask]:
    return type(f"InfiniteBenchGenerated_{task}", (GeneratedTask,), {"short_name": task})
