"""Reasoning-benchmark facts: the prompt directive, the generation length, and where each dataset's files live.

Sources (docs/math.md says what each is used for):

- ``DIRECTIVE``: deepseek-ai/DeepSeek-R1 README.md at 0cf78561f1d51c84a21b2190626b21116d5c68bb, "Usage
  Recommendations" 3 ("Please reason step by step, and put your final answer within \\boxed{}."), and 2 (no system
  prompt: every instruction in the user turn); joined to the problem by one newline as in QwenLM/Qwen2.5-Math
  evaluation/utils.py at a45202bd16f1ec06f433442dc1152d0074773465 (``PROMPT_TEMPLATES["qwen-boxed"]`` user turn,
  and ``"mathstral"``, the same text without a chat template).
- ``RAW_ANSWER_CUE``: kvbench's cue for a model without a chat template (the Minerva / lm-eval "Solution:" word):
  the prompt then ends where the model's reasoning begins.
- ``MAX_NEW_TOKENS`` = 32768: DeepSeek-R1 README "Evaluation Results" ("the maximum generation length is set to
  32,768 tokens"); huggingface/lighteval src/lighteval/tasks/tasks/math_500.py at
  3fd15266bc8448b797e61462d293aa3fd40b3580 (``generation_size=32768``).
- ``SOURCES``: the hub datasets' current cards and file lists (docs/math.md, "Data"): HuggingFaceH4/MATH-500
  (test.jsonl: problem, solution, answer, subject, level, unique_id), HuggingFaceH4/aime_2024
  (data/train-*.parquet: id, problem, solution, answer, url, year), Maxwell-Jia/AIME_2024
  (aime_2024_problems.parquet: ID, Problem, Solution, Answer), opencompass/AIME2025 (aime2025-I.jsonl,
  aime2025-II.jsonl: question, answer), yentinglin/aime_2025 and MathArena/aime_2025 (both data/train-*.parquet:
  problem, answer, and id or problem_idx; one layout, read by ``AIME25_YENTINGLIN``). lighteval reads
  HuggingFaceH4/aime_2024 and yentinglin/aime_2025 (src/lighteval/tasks/tasks/aime.py at 3fd1526).
"""
from __future__ import annotations

from dataclasses import dataclass

SUITE = "math"
DIRECTIVE = "Please reason step by step, and put your final answer within \\boxed{}."
RAW_ANSWER_CUE = "\nSolution:"
MAX_NEW_TOKENS = 32768
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # lighteval's default reasoning_tags (pipeline.py)


@dataclass(frozen=True)
class Source:
    """One hub dataset's layout: the files of a download of it and the record keys it uses.

    ``files`` are glob patterns relative to the download's root, each of which must match (AIME2025's two parts);
    a ``.parquet`` pattern also matches the same name ending ``.jsonl`` (the file converted to JSON lines). The
    root is ``task.data_dir`` itself or its subfolder ``folder`` (the repository's name, where ``git clone`` or
    ``huggingface-cli download --local-dir <name>`` puts it), so one data_dir may hold every dataset of the suite.
    """

    repo: str
    files: tuple[str, ...]
    problem: str
    answer: str
    required: tuple[str, ...]  # keys every record must have (problem and answer among them)
    id_keys: tuple[str, ...] = ()  # the record's own id, the first present

    @property
    def folder(self) -> str:
        return self.repo.split("/", 1)[1]

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}"


MATH500 = Source("HuggingFaceH4/MATH-500", ("test.jsonl",), "problem", "answer",
                 ("problem", "solution", "answer", "subject", "level", "unique_id"), ("unique_id",))
AIME24_H4 = Source("HuggingFaceH4/aime_2024", ("data/train-*.parquet",), "problem", "answer",
                   ("id", "problem", "solution", "answer", "url", "year"), ("id",))
AIME24_MAXWELL = Source("Maxwell-Jia/AIME_2024", ("aime_2024_problems.parquet",), "Problem", "Answer",
                        ("ID", "Problem", "Solution", "Answer"), ("ID",))
AIME25_OPENCOMPASS = Source("opencompass/AIME2025", ("aime2025-I.jsonl", "aime2025-II.jsonl"), "question", "answer",
                            ("question", "answer"))
# MathArena/aime_2025 has this layout too (problem_idx, problem, answer, problem_type), in a folder of the same name
AIME25_YENTINGLIN = Source("yentinglin/aime_2025", ("data/train-*.parquet",), "problem", "answer",
                           ("problem", "answer"), ("id", "problem_idx"))


@dataclass(frozen=True)
class Dataset:
    short_name: str
    title: str
    year: int | None  # the contest year (AIME), None for MATH-500
    sources: tuple[Source, ...]  # looked for in this order; the first found is read


DATASETS: dict[str, Dataset] = {
    "aime24": Dataset("aime24", "AIME 2024", 2024, (AIME24_H4, AIME24_MAXWELL)),
    "aime25": Dataset("aime25", "AIME 2025", 2025, (AIME25_OPENCOMPASS, AIME25_YENTINGLIN)),
    "math500": Dataset("math500", "MATH-500", None, (MATH500,)),
}
