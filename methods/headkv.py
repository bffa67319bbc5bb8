"""HeadKV ("Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval and Reasoning",
Fu et al., ICLR 2025, arXiv:2410.19258): per-(layer, KV head) budgets from offline head importance scores
(allocator ``headkv``; any scorer picks the entries within a head, conf/method/headkv.yaml pairs it with SnapKV
as the paper does).

Official code: github.com/FYYFU/HeadKV, commit 0862a09 (``headkv/snapkv_utils.py: ReasonSnapKVCluster``,
``run_longbench.py``, ``Important_Head/retrieval_head_detection_r2.py``).

* **Budgets** (``headkv_budgets``; the official ``ReasonSnapKVCluster.__init__``). Head scores ``s`` (the mean of
  each head's list in the file) are normalised to sum 1, raised to the power ``temp`` and normalised again. With
  ``base = b - window`` the per-head budget beyond the recent window (``b = n_keep(T, keep_ratio)``, the uniform
  budget, window included; the official ``max_capacity_prompts - window_size``), every head gives up
  ``base // beta`` entries to a pool shared by all heads of all layers and gets back its share of the pool::

      pool = (base // beta) * L * H          min = base - base // beta          (Python's float floor division)
      capacity(l, h) = share(l, h) * pool + min,   budget = capacity + window

  so a head never keeps fewer than ``min + window`` and the budgets sum to the uniform total ``L * H * b``.
  kvbench rounds that sum exactly (``harness.compress.round_to_total``: floor, then +1 to the largest
  fractional parts, ties to the lower (layer, head)), a head capped at its ``T`` entries passing the excess on by
  the same rule; the official ``torch.round`` of each head sums to the total up to rounding, and a capacity
  above a head's context is cut there and lost. Where the official rounding already sums exactly and no
  fraction is exactly 1/2, both give the same budgets (tests/fixtures/headkv: official outputs). Layers of
  different lengths (kvbench allows them) pool ``sum_l H * (base_l // beta)`` and keep their own ``min_l``.
* **GQA**: the official code compresses after ``repeat_kv``, one budget per *query* head (the file's heads); a
  KV head here gets the mean of its group's official capacities (its group's shares summed, a pool of ``L *
  H_kv`` heads), so the cache, which stores KV heads, holds the same total.
* **Defaults**: ``beta`` 1.5 and ``temp`` 1 (``run_longbench.py``'s argparse; the authors' scripts sweep beta over
  1.005 .. 10, a larger beta a larger pool); the official runs use SnapKV with window 8, kernel 7, max-pool.

**Score files** (``method.allocator.scores``): the official ``Important_Head/head_score/<model>_*_heads.json``
format, which ``ReasonSnapKVCluster`` reads with ``json.loads(file.readline())``: line 1 is one JSON object
``{"<layer>-<head>": [score, ...], ...}`` over every (layer, query head) of the model, a score per successful
needle test. kvbench's files (``python -m methods.headkv``) write the same line 1, which the official code
reads unchanged, and a line 2 ``{"kvbench": {...}}`` with the model's identity and the calibration, checked
against the model at run time (an official file is checked by its layers x query heads only). ``scores: null``
is the reference model's shipped file (``SHIPPED``), refused for another model.

**Computing scores** (``python -m methods.headkv model=<m> task=<t> context_length=<T> n_samples=<n>
out=<file.json>``): the official retrieval-reasoning (R2) score of ``retrieval_head_detection_r2.py`` on kvbench's
own generated needles (see ``needle_test``): greedy decoding of the answer on the full cache; at every step, for
each (layer, query head), the attention of the step's query over the whole cache, its top-``k`` positions with
``k`` the needle's length in tokens, and the attention of those inside the needle summed and divided by ``k``;
the steps' sum is the head's score for the sample, kept only when the answer was right. Differences: the needle
is the sample's evidence (RULER's value, the variable-tracking chain: ``meta["evidence"]``, else
``meta["needle_spans"]``) where the official uses its own reasoning needles (two people, their ages and
favourite things; no download here); a prediction counts when the task's own metric gives it more than 0.5
(the official: LongBench's qa_f1 above 50 on its single answer); decoding stops at EOS, a newline or the
answers' length in tokens written as the model writes them (a leading space, several answers joined by ``", "``;
the official: the answer's own token count).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from harness.compress import Allocator, LayerInputs, Scorer, n_keep, register_allocator, round_to_total
from harness.errors import KvbenchError
from harness.paths import find_input, read_text
from harness.schema import NonNegative, NonNegativeFloat
from methods._attention import attention_probs

FORMAT = "kvbench-headkv-scores/1"  # line 2's ``kvbench.format``
SHIPPED = "harness/reference/headkv_scores.json"  # the reference model's, made by scripts/reference_results.sh
COMMAND = ("python -m methods.headkv model=<model> task=<task> context_length=<T> n_samples=<n> "
           "out=<file.json>")
OFFICIAL_FORMAT = ('HeadKV\'s head-score file: line 1 one JSON object {"<layer>-<head>": [score, ...]} over every '
                   "layer and query head (github.com/FYYFU/HeadKV Important_Head/head_score/)")
OFFICIAL_BETA, OFFICIAL_TEMP = 1.5, 1.0  # run_longbench.py's argparse defaults (FYYFU/HeadKV 0862a09)


# --------------------------------------------------------------------------------------------------------------
# Score files


@dataclass
class HeadScores:
    """One file's head scores: ``lists[l][h]`` the per-test scores of (layer, query head), ``meta`` line 2's."""

    lists: list[list[list[float]]]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_layers(self) -> int:
        return len(self.lists)

    @property
    def n_heads(self) -> int:
        return len(self.lists[0])

    def importance(self) -> list[float]:
        """The heads' mean scores, layer-major (the official ``[np.mean(l[1]) for l in head_list.items()]``)."""
        import numpy as np

        return [float(np.mean(scores)) for row in self.lists for scores in row]


def resolve(path: str | Path) -> Path:
    """The score file by the rule of every input file (working dir, then repository); as given when not found."""
    return find_input(path) or Path(path).expanduser()


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def parse_head_scores(text: str, where: str) -> HeadScores:
    """The file's text checked: line 1 the official object (a whole-file object is accepted too), a complete
    grid of ``"<layer>-<head>"`` keys, non-empty lists of finite non-negative numbers; line 2, if any, our meta."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise KvbenchError(f"{where} is empty; give {OFFICIAL_FORMAT}, or make one with {COMMAND}")
    meta_line: str | None = None
    try:
        table = json.loads(lines[0])
        meta_line = lines[1] if len(lines) > 1 else None
        if len(lines) > 2:
            raise KvbenchError(f"{where} has {len(lines)} lines; a head-score file has the score object on line 1 "
                               "and at most kvbench's metadata on line 2")
    except json.JSONDecodeError:
        try:  # the object pretty-printed over several lines
            table = json.loads(text)
        except json.JSONDecodeError as err:
            raise KvbenchError(f"{where} is not JSON (line {err.lineno}: {err.msg}); give {OFFICIAL_FORMAT}") from None
    if not isinstance(table, dict) or not table:
        raise KvbenchError(f"{where}: line 1 is not a non-empty JSON object; give {OFFICIAL_FORMAT}")
    cells: dict[tuple[int, int], list[float]] = {}
    for key, scores in table.items():
        layer, _, head = str(key).partition("-")
        if not (layer.isdigit() and head.isdigit()):
            raise KvbenchError(f"{where}: key {key!r} is not '<layer>-<head>' (e.g. '0-3'); give {OFFICIAL_FORMAT}")
        if not isinstance(scores, list) or not scores or not all(_number(v) for v in scores):
            raise KvbenchError(f"{where}: head {key!r} holds {str(scores)[:60]!r}, not a non-empty list of finite "
                               f"scores >= 0; give {OFFICIAL_FORMAT}")
        cells[(int(layer), int(head))] = [float(v) for v in scores]
    n_layers = 1 + max(l for l, _ in cells)
    n_heads = 1 + max(h for _, h in cells)
    missing = [f"{l}-{h}" for l in range(n_layers) for h in range(n_heads) if (l, h) not in cells]
    if missing:
        raise KvbenchError(f"{where}: {len(missing)} of {n_layers} x {n_heads} heads have no scores (first: "
                           f"{missing[0]!r}); the file must cover every layer and query head")
    meta: dict[str, Any] = {}
    if meta_line is not None:
        try:
            extra = json.loads(meta_line)
        except json.JSONDecodeError as err:
            raise KvbenchError(f"{where}: line 2 is not JSON ({err.msg}); it may only hold kvbench's "
                               '{"kvbench": {...}} metadata') from None
        if not isinstance(extra, dict) or set(extra) != {"kvbench"} or not isinstance(extra["kvbench"], dict):
            raise KvbenchError(f"{where}: line 2 is not kvbench's {{\"kvbench\": {{...}}}} metadata")
        meta = extra["kvbench"]
    lists = [[cells[(l, h)] for h in range(n_heads)] for l in range(n_layers)]
    if not sum(sum(scores) for row in lists for scores in row) > 0:
        raise KvbenchError(f"{where}: every head scores 0; the shares would be undefined (0 / 0)")
    return HeadScores(lists, meta)


def load_head_scores(path: str | Path, where: str = "method.allocator.scores") -> HeadScores:
    path = resolve(path)
    where = f"{where}={str(path)!r}"
    if not path.is_file():
        raise KvbenchError(f"{where} does not exist or is not a file; give {OFFICIAL_FORMAT}, or make one with "
                           f"{COMMAND}")
    heads = parse_head_scores(read_text(path, f"give {OFFICIAL_FORMAT}"), where)
    heads.path = path
    return heads


def save_head_scores(path: str | Path, lists: list[list[list[float]]], meta: dict[str, Any]) -> Path:
    """Line 1 the official object (layer-major keys, as the official detection writes them), line 2 our meta."""
    from harness.io import atomic_write_text

    table = {f"{l}-{h}": scores for l, row in enumerate(lists) for h, scores in enumerate(row)}
    atomic_write_text(path, json.dumps(table) + "\n" + json.dumps({"kvbench": {"format": FORMAT, **meta}}) + "\n")
    return Path(path)


def check_head_scores(heads: HeadScores, model: nn.Module, where: str) -> None:
    """Refuse scores of another model: its layers x query heads always, the identity line 2 records too."""
    from harness.models import check_model_identity, model_identity

    facts = model_identity(model)
    remedy = f"make this model's with {COMMAND}"
    if (heads.n_layers, heads.n_heads) != (facts["n_layers"], facts["n_heads"]):
        raise KvbenchError(f"{where} scores {heads.n_layers} layers x {heads.n_heads} query heads; this model has "
                           f"{facts['n_layers']} x {facts['n_heads']}: {remedy}")
    if heads.meta:
        check_model_identity(heads.meta, model, f"{where} was measured on model {heads.meta.get('model', '?')!r}",
                             remedy, name=str(heads.meta.get("model") or "") or None)


# --------------------------------------------------------------------------------------------------------------
# Budgets


def head_shares(importance: list[float], temp: float) -> Tensor:
    """Shares summing to 1 (float64, layer-major), as ``ReasonSnapKVCluster``: the mean scores over their sum,
    to the power ``temp``, normalised again."""
    total = sum(importance)  # a Python sum in file order, as the official ``sum(head_score_list)``
    shares = torch.tensor([s / total for s in importance], dtype=torch.float64)
    shares = torch.pow(shares, temp)
    return shares / torch.sum(shares)


def headkv_budgets(shares: Tensor, n_tokens: list[int], n_kv_heads: int, keep_ratio: float, beta: float,
                   window: int, rule: str = "floor") -> Tensor:
    """Integer budgets ``[L, H_kv]`` summing to ``H_kv * sum_l n_keep(T_l, keep_ratio)`` from the query-head shares
    ``[L, H_q]`` (``head_shares``, reshaped), each head's ``window`` included (see the module docstring)."""
    n_layers, n_q = shares.shape
    kv_shares = shares.double().reshape(n_layers, n_kv_heads, n_q // n_kv_heads).sum(dim=-1)
    per_head = [n_keep(t, keep_ratio, rule) for t in n_tokens]
    windows = [min(window, b) for b in per_head]
    bases = [b - w for b, w in zip(per_head, windows)]
    pooled = [base // beta for base in bases]  # the official ``base_capacity // beta``: a float floor division
    pool = sum(pooled) * n_kv_heads  # (base // beta) * L * H when every layer is alike
    floors = torch.tensor([base - p for base, p in zip(bases, pooled)], dtype=torch.float64)[:, None]
    ideal = kv_shares * pool + floors  # the capacities beyond the window
    win = torch.tensor(windows, dtype=torch.long)[:, None]
    hi = (torch.tensor(n_tokens, dtype=torch.long)[:, None] - win).expand(-1, n_kv_heads)
    lo = (1 - win).clamp(min=0).expand(-1, n_kv_heads)  # every head keeps one entry at least
    total = n_kv_heads * sum(bases)
    return (round_to_total(ideal, total, lo, hi).reshape(n_layers, n_kv_heads) + win).long()


@register_allocator("headkv")
class HeadKVAllocator(Allocator):
    per_head_budgets = True
    per_layer_budgets = True
    needs_every_layer = True  # a budget for every layer from what it measured there

    def __init__(self, scores: str | None = None, beta: Annotated[float, Field(ge=1.0)] = OFFICIAL_BETA,
                 temp: NonNegativeFloat = OFFICIAL_TEMP, window: NonNegative = 0):
        self.beta, self.temp, self.window = float(beta), float(temp), int(window)
        if not self.beta >= 1.0:
            raise KvbenchError(f"method.allocator.beta={beta} must be >= 1 (HeadKV's pool: every head gives up "
                               "base // beta of its budget)")
        if not self.temp >= 0.0:
            raise KvbenchError(f"method.allocator.temp={temp} must be >= 0 (the power of the head shares)")
        self.scores_arg = scores
        self.heads = load_head_scores(scores or SHIPPED)
        self.shares = head_shares(self.heads.importance(), self.temp).reshape(self.heads.n_layers,
                                                                              self.heads.n_heads)

    @property
    def where(self) -> str:
        return f"method.allocator.scores={self.scores_arg!r}"

    def input_files(self) -> dict[str, Path]:
        return {"method.allocator.scores": self.heads.path} if self.heads.path is not None else {}

    def bind_model(self, model: nn.Module) -> None:
        """Refuse head scores measured on another model (one-line ``KvbenchError``)."""
        where = self.where if self.scores_arg else f"method.allocator.scores=null (the reference model's {SHIPPED})"
        check_head_scores(self.heads, model, where)

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        n_kv = scores[0].shape[-2]
        if len(scores) != self.heads.n_layers or self.heads.n_heads % n_kv:
            raise KvbenchError(f"{self.where} scores {self.heads.n_layers} layers x {self.heads.n_heads} query "
                               f"heads; this run scores {len(scores)} layers x {n_kv} KV heads: make this model's "
                               f"with {COMMAND}")
        return headkv_budgets(self.shares, [int(s.shape[-1]) for s in scores], n_kv, keep_ratio, self.beta,
                              self.window, self.budget_rule)


# --------------------------------------------------------------------------------------------------------------
# Measuring the retrieval-reasoning scores


class _StepAttention(Scorer):
    """A scorer for harness.attention.Hooks that keeps nothing: each layer's attention of the step's query over
    the whole cache, ``rows[layer] [H_q, T]``."""

    def __init__(self):
        self.rows: dict[int, Tensor] = {}

    def score(self, inputs: LayerInputs) -> None:
        n_all = inputs.keys.shape[2]
        probs = attention_probs(inputs.queries[:, :, -1:], inputs.keys, inputs.scaling, n_all - 1)
        self.rows[inputs.layer_idx] = probs[0, :, 0].cpu()
        return None


def needle_hits(rows: dict[int, Tensor], needle: Tensor) -> Tensor:
    """``[L, H_q]`` one step's score: per head, the attention of its top-``k`` positions (``k`` = the needle's
    length) that lie inside the needle, summed, over ``k`` (``retrieval_calculate``)."""
    k = int(needle.numel())
    out = []
    for layer in sorted(rows):
        values, idx = rows[layer].topk(min(k, rows[layer].shape[-1]), dim=-1)
        out.append((values * torch.isin(idx, needle)).sum(dim=-1) / k)
    return torch.stack(out).double()


@torch.no_grad()
def needle_test(model, hooks, prompt: list[int], needle: list[int], n_steps: int, stop: set[int],
                decode) -> tuple[str, Tensor]:
    """Greedy decoding of at most ``n_steps`` tokens after ``prompt`` on the full cache (the official prefill of
    all but the last token, which is then fed as the first step), stopping at a ``stop`` id or a newline;
    ``(prediction, [L, H_q] scores summed over the steps)``."""
    from transformers import DynamicCache

    from harness.compat import cache_of, with_cache

    device = model.device
    ids = torch.tensor([prompt[:-1]], device=device)
    out = model(input_ids=ids, position_ids=torch.arange(len(prompt) - 1, device=device)[None],
                **with_cache(DynamicCache()), use_cache=True, logits_to_keep=1)
    cache, token, position = cache_of(out), prompt[-1], len(prompt) - 1
    needle_t = torch.tensor(sorted(set(needle)))
    total, generated = None, []
    capture = _StepAttention()
    for _ in range(n_steps):
        with hooks.scoring(capture, 0):
            out = model(input_ids=torch.tensor([[token]], device=device),
                        position_ids=torch.tensor([[position]], device=device), **with_cache(cache),
                        use_cache=True, logits_to_keep=1)
        step = needle_hits(capture.rows, needle_t)
        total = step if total is None else total + step
        cache, token, position = cache_of(out), int(out.logits[0, -1].argmax()), position + 1
        generated.append(token)
        if token in stop or "\n" in decode([token]):
            break
    return decode(generated).strip(), total


def measure_head_scores(model, tokenizer, task, encoder, samples) -> tuple[list[list[list[float]]], int]:
    """Per (layer, query head), the scores of the samples answered right; and how many were."""
    from harness.attention import install
    from harness.models import model_identity

    facts = model_identity(model)
    lists: list[list[list[float]]] = [[[] for _ in range(facts["n_heads"])] for _ in range(facts["n_layers"])]
    stop = {int(i) for i in [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
            if isinstance(i, int)}
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    right = 0
    with install(model) as hooks:
        for sample in samples:
            spans = sample.meta.get("evidence") or sample.meta.get("needle_spans")
            if not spans:
                raise KvbenchError(f"task={task.name!r}: sample {sample.sample_id} marks no evidence (meta evidence / "
                                   "needle_spans); HeadKV's scores need the needle's tokens: use a generated "
                                   "task (ruler/niah_*, ruler/vt, niah, infinitebench/passkey, ...)")
            ctx, question = encoder.encode_sample(sample)
            needle = encoder.context_token_indices(sample.context, spans)
            written = tokenizer(" " + ", ".join(sample.answers), add_special_tokens=False).input_ids
            prediction, scores = needle_test(model, hooks, ctx + question, needle,
                                             max(1, min(int(sample.max_new_tokens), len(written))), stop, decode)
            if task.score(prediction, sample) > 0.5:  # the official: qa_f1 * 100 > 50
                right += 1
                for l, row in enumerate(scores.tolist()):
                    for h, value in enumerate(row):
                        lists[l][h].append(value)
    return lists, right


class Options(BaseModel):
    """The command's own keys (from the command line as text)."""
    model_config = ConfigDict(extra="forbid")
    out: Annotated[str, Field(min_length=1)]


def run(argv: list[str]) -> str:
    from omegaconf import OmegaConf

    import tasks
    from harness.models import model_identity
    from methods._calibration import prepare, provenance
    from tasks.base import PromptEncoder

    if "task=random" in argv:
        raise KvbenchError("task=random has no needle; HeadKV's scores need a task whose samples mark their evidence "
                           "(ruler/niah_*, ruler/vt, niah, ...)")
    if not any(a.startswith("out=") for a in argv):
        raise KvbenchError("out=<file.json> is required (where the head scores are written)")
    cal = prepare(argv, Options)
    cfg = cal.cfg
    params = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k not in ("name", "exclude")}
    task = tasks.get_task(str(cfg.task.name), **params)
    encoder = PromptEncoder.for_task(cal.tokenizer, task, bool(cfg.model.get("chat", False)))
    n_samples = None if cfg.n_samples is None else int(cfg.n_samples)
    samples = list(task.samples(encoder, int(cfg.context_length), n_samples, int(cfg.seed)))
    lists, right = measure_head_scores(cal.model, cal.tokenizer, task, encoder, samples)
    if right == 0:
        raise KvbenchError(f"no sample of task={task.name!r} at context_length={cfg.context_length} was answered right "
                           f"({len(samples)} tried): the file would hold no scores; use a task and length this "
                           "model solves")
    meta = {**cal.meta, **model_identity(cal.model), "n_samples": len(samples), "n_right": right,
            "score": "retrieval-reasoning (HeadKV R2): attention of each step's top-k positions inside the needle, "
                     "over k, summed over the greedy answer's steps; right answers only",
            **provenance("python -m methods.headkv", argv)}
    path = save_head_scores(cal.own["out"], lists, meta)
    return (f"{path}: head scores of {len(lists)} layers x {len(lists[0])} query heads from {right} of "
            f"{len(samples)} {task.name} samples answered right at {cfg.context_length} tokens")


def main(argv: list[str] | None = None) -> None:
    from methods._calibration import main as command

    command("python -m methods.headkv", __doc__, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
