"""DuoAttention ("DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", Xiao et
al., arXiv:2410.10819): retrieval heads keep the whole cache, streaming heads keep the first ``sink_size`` tokens
and the last ``recent_size`` ones.

* **Head patterns**: one score per (layer, KV head) in [0, 1], the gate ``alpha`` of an optimisation that mixes
  each head's full and streaming attention, ``alpha * full + (1 - alpha) * streaming``, so that the model's last
  hidden states on synthetic passkey answers match the full model's (MSE on the answer positions) under an L1
  penalty on the gates. High = retrieval head. Published patterns (github.com/mit-han-lab/duo-attention,
  ``attn_patterns/<model>/.../full_attention_heads.tsv``: ``n_layers`` rows of ``n_kv_heads`` tab-separated
  numbers, clipped to [0, 1] when read, and ``config.json`` beside it with ``sink_size`` / ``recent_size``)
  load with ``method.scorer.patterns=<the .tsv or its dir>``. ``python -m methods.duo_attention model=<m> out=<dir>``
  runs our own short version of the optimisation (``profile``: gates initialised at 1, AdamW lr 0.02, reg 0.05,
  the official warm-up/cool-down schedule, a few hundred steps on kvbench's generated passkey prompts or on
  random-id passkeys) and writes the official format plus our model identity in ``config.json``.
* **Which heads stream**: the lowest-scored heads over the whole model (as the official ``sparsify`` and
  kvpress). How many: ``budget=memory`` (ours) makes the cache exactly the keep ratio's, the uniform total
  ``sum_l H * n_keep(T_l, r)``: heads turn streaming in ascending score until the total fits, the last one keeping
  a longer recent window so that the total is exact, and when even all-streaming heads exceed it, every head's
  window shrinks (the paper fixes the windows and reports the memory that results; a benchmark at fixed keep
  ratios needs the totals equal). ``budget=heads`` (kvpress's evaluation: ``head_compression_ratio =
  compression_ratio``): ``round(n_heads * (1 - keep_ratio))`` streaming heads, windows fixed, whatever memory
  that keeps. ``method.preset=kvpress`` sets ``budget=heads``.
* Within a head: sinks first, then the most recent tokens (the scorer's order). Heads keep different numbers of
  entries: the cache is ragged, ``kv_bytes`` counts what each head holds. As in kvpress, the decision is made
  once on the prefill; tokens decoded afterwards are all kept (the paper's streaming heads also evict as they
  decode).

``patterns: null`` (the default): the reference model's shipped patterns (``SHIPPED``) on the reference model,
else a short profile made when the model is bound (``ON_THE_FLY``, random-id passkeys; a profile made with the
command on the task's prompts is better). kvpress downloads the published patterns (or, experimentally, scores
heads from mean queries and keys); both sides of our conformance test read the same local file.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from harness.compress import (KVPRESS_BUDGET, Allocator, LayerInputs, Scorer, n_keep, register_allocator,
                              register_scorer, round_to_total)
from harness.errors import KvbenchError
from harness.paths import find_input, read_json_object, read_text
from harness.schema import Count, NonNegative

PATTERN_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
SHIPPED = "harness/reference/duo_attention"  # the reference model's patterns, made by this module's command
DEFAULT_SINK, DEFAULT_RECENT = 64, 256  # the official training defaults (duo_attn/utils.py), for a file without config
ON_THE_FLY = {"steps": 40, "n": 4, "length": 256, "sink_size": 16, "recent_size": 32, "seed": 0}
COMMAND = "python -m methods.duo_attention model=<model> out=<dir>"


# --------------------------------------------------------------------------------------------------------------
# Pattern files (the official format)


@dataclass
class Pattern:
    scores: Tensor  # [L, H_kv] in [0, 1]: high = retrieval head
    sink_size: int
    recent_size: int
    source: str
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # config.json (ours records the model identity)


def resolve(path: str | Path) -> Path:
    """The pattern file: the path (working dir, then repository), or ``full_attention_heads.tsv`` inside a dir."""
    found = find_input(path) or Path(path).expanduser()
    return found / PATTERN_FILE if found.is_dir() else found


def load_pattern(path: str | Path, where: str = "method.scorer.patterns") -> Pattern:
    """Head scores from a ``full_attention_heads.tsv`` (clipped to [0, 1], as the official loader and kvpress)
    and ``sink_size`` / ``recent_size`` from the ``config.json`` beside it, when there is one."""
    path = resolve(path)
    where = f"{where}={str(path)!r}"
    hint = (f"give DuoAttention's {PATTERN_FILE} (n_layers rows of n_kv_heads tab-separated numbers) or its dir, or "
            f"make one with {COMMAND}")
    if not path.is_file():
        raise KvbenchError(f"{where} does not exist or is not a file; {hint}")
    rows = [line for line in read_text(path, hint).splitlines() if line.strip()]
    try:
        values = [[float(x) for x in line.strip().split("\t")] for line in rows]
    except ValueError as err:
        raise KvbenchError(f"{where}: not a table of numbers ({err}); {hint}") from None
    if not values or len({len(r) for r in values}) != 1:
        raise KvbenchError(f"{where}: rows of different lengths (or none); {hint}")
    scores = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(scores).all():
        raise KvbenchError(f"{where}: non-finite head scores; {hint}")
    meta: dict[str, Any] = {}
    config = path.parent / CONFIG_FILE
    if config.is_file():
        meta = read_json_object(config, hint)
    sink, recent = meta.get("sink_size", DEFAULT_SINK), meta.get("recent_size", DEFAULT_RECENT)
    if not all(type(v) is int and v >= 0 for v in (sink, recent)):
        raise KvbenchError(f"{config}: sink_size {sink!r} and recent_size {recent!r} must be whole numbers >= 0")
    return Pattern(scores.clamp(0, 1), sink, recent, str(path), path, meta)


def save_pattern(out: str | Path, scores: Tensor, meta: dict[str, Any]) -> Path:
    """``out/full_attention_heads.tsv`` (the official layout: ``np.savetxt`` with tabs) and ``out/config.json``."""
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savetxt(out / PATTERN_FILE, scores.double().numpy(), delimiter="\t")
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out / PATTERN_FILE


def check_pattern(pattern: Pattern, model: nn.Module, where: str) -> None:
    """Refuse patterns of another model: the table's shape always, the identity our files record too."""
    from harness.models import check_model_identity, model_identity

    facts = model_identity(model)
    shape = (facts["n_layers"], facts["n_kv_heads"])
    if tuple(pattern.scores.shape) != shape:
        raise KvbenchError(f"{where} holds head scores for {pattern.scores.shape[0]} layers x {pattern.scores.shape[1]} "
                           f"KV heads; this model has {shape[0]} x {shape[1]}: profile it with {COMMAND}")
    recorded = pattern.meta.get("kvbench_model")
    if isinstance(recorded, dict):
        check_model_identity(recorded, model, f"{where} was profiled for model {recorded.get('model', '?')!r}",
                             f"profile this model with {COMMAND}", name=str(recorded.get("model") or "") or None)


# --------------------------------------------------------------------------------------------------------------
# Profiling: the gate optimisation


def streaming_mask(n: int, sink: int, recent: int, device=None) -> Tensor:
    """``[n, n]`` bool: query ``i`` sees key ``j <= i`` when ``j < sink`` or ``i - j < recent``."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < sink) | (i - j < recent))


class _Gated:
    """Attention ``a * full + (1 - a) * streaming`` per KV head (``a`` expanded over its query heads), or plain
    full attention when ``gates`` is None (the teacher)."""

    def __init__(self, gates: nn.Parameter | None, sink: int, recent: int):
        self.gates, self.sink, self.recent = gates, sink, recent

    def __call__(self, module, query, key, value, scaling):
        from methods._calibration import causal_attention

        full = causal_attention(query, key, value, scaling)  # [B, T, H_q, D]
        if self.gates is None:
            return full
        mask = streaming_mask(query.shape[2], self.sink, self.recent, query.device)
        stream = causal_attention(query, key, value, scaling, mask[None, None])
        group = query.shape[1] // key.shape[1]
        a = self.gates[module.layer_idx].repeat_interleave(group).to(full.dtype)[None, None, :, None]
        return a * full + (1 - a) * stream


def passkey_prompts(vocab_size: int, n: int, length: int, seed: int = 0, n_keys: int = 4, key_len: int = 6
                    ) -> list[tuple[list[int], list[int]]]:
    """Synthetic passkey retrieval in id space (no tokenizer): random-id haystacks holding ``n_keys`` random
    ``key_len``-id passkeys at random depths; the future part repeats a marker and then the passkeys, in order
    (their positions are the answer positions the loss reads)."""
    gen = torch.Generator().manual_seed(seed)
    low = min(8, vocab_size - 1)
    rand = lambda k: torch.randint(low, vocab_size, (k,), generator=gen).tolist()  # noqa: E731
    marker = rand(4)
    out = []
    for _ in range(n):
        keys = [rand(key_len) for _ in range(n_keys)]
        hay = rand(max(1, length - n_keys * (key_len + len(marker)) - len(marker)))
        cuts = sorted(torch.randint(0, len(hay), (n_keys,), generator=gen).tolist())
        ctx, last = [], 0
        for cut, key in zip(cuts, keys):
            ctx += hay[last:cut] + marker + key
            last = cut
        ctx += hay[last:]
        out.append((ctx, marker + [t for key in keys for t in key]))
    return out


def profile(model: nn.Module, prompts: list[tuple[list[int], list[int]]], steps: int, sink_size: int,
            recent_size: int, lr: float = 0.02, reg: float = 0.05, seed: int = 0, log=None) -> Tensor:
    """Head scores ``[L, H_kv]``: the gates after ``steps`` AdamW steps (one prompt per step, in turn) on
    ``MSE(h_gated, h_full)`` at the answer positions (the hidden states that predict the future part's tokens)
    ``+ reg * mean|gates|``, gates clamped to [0, 1] before every step (as the official train.py)."""
    from harness.models import model_identity
    from methods._calibration import attention_function

    facts = model_identity(model)
    torch.manual_seed(seed)
    device = model.device
    gates = nn.Parameter(torch.ones(facts["n_layers"], facts["n_kv_heads"], device=device))
    optim = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    warm = max(1, steps // 5)  # the official schedule: linear warm-up over a fifth, cool-down over the last fifth
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1, max((s + 1) / warm, 0.1),
                                                                      max((steps - s) / warm, 0.1)))
    data = []
    with torch.no_grad(), attention_function(model, _Gated(None, sink_size, recent_size)):
        for ctx, future in prompts:
            ids = torch.tensor([ctx + future], device=device)
            rows = torch.arange(len(ctx) - 1, len(ctx) + len(future) - 1, device=device)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, rows]
            data.append((ids, rows, hidden))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with attention_function(model, _Gated(gates, sink_size, recent_size)):
            for step in range(steps):
                with torch.no_grad():
                    gates.clamp_(0, 1)
                ids, rows, target = data[step % len(data)]
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, rows]
                distill = (hidden.float() - target.float()).pow(2).mean(dim=-1).mean()
                loss = distill + reg * gates.abs().mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                sched.step()
                if log is not None and (step % 25 == 0 or step == steps - 1):
                    log(f"step {step + 1}/{steps}: distill {float(distill.detach()):.4g}, mean gate {float(gates.detach().mean()):.3f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return gates.detach().clamp(0, 1).cpu().double()


_MEMO: dict[tuple, Pattern] = {}


def default_pattern(model: nn.Module) -> Pattern:
    """``patterns: null``: the shipped patterns where they were made for this model, else a short profile on
    random-id passkeys (once per model in a process)."""
    from harness.models import model_identity

    facts = model_identity(model)
    key = (facts["config_hash"], round(facts["fingerprint"], 3))
    if key not in _MEMO:
        try:
            pattern = load_pattern(SHIPPED, "shipped")
            check_pattern(pattern, model, "shipped")
            pattern.source = f"shipped ({SHIPPED})"
        except KvbenchError:
            cfg = ON_THE_FLY
            vocab = int(getattr(getattr(model.config, "text_config", model.config), "vocab_size"))
            scores = profile(model, passkey_prompts(vocab, cfg["n"], cfg["length"], cfg["seed"]), cfg["steps"],
                             cfg["sink_size"], cfg["recent_size"], seed=cfg["seed"])
            pattern = Pattern(scores, cfg["sink_size"], cfg["recent_size"],
                              "profiled at load ({steps} steps on {n} random-id passkey prompts of {length} tokens, "
                              "sink {sink_size}, recent {recent_size})".format(**cfg))
        _MEMO[key] = pattern
    return _MEMO[key]


class _Patterned:
    """What the scorer and the allocator share: the pattern of ``patterns`` (or the default) and its windows
    (``sink_size`` / ``recent_size`` given here win over the file's)."""

    def _init_pattern(self, patterns: str | None, sink_size: int | None, recent_size: int | None, part: str) -> None:
        self.patterns, self.sink_arg, self.recent_arg = patterns, sink_size, recent_size
        self.where = f"method.{part}.patterns={str(patterns)!r}"
        self.pattern: Pattern | None = load_pattern(patterns, f"method.{part}.patterns") if patterns else None
        self._bound: set[int] = set()

    def bind_model(self, model: nn.Module) -> None:
        if id(model) in self._bound:
            return
        if self.patterns:
            check_pattern(self.pattern, model, self.where)
        else:
            self.pattern = default_pattern(model)
        self._bound.add(id(model))

    def input_files(self) -> dict[str, Path]:
        if self.pattern is None or self.pattern.path is None:
            return {}
        return {f"{self.where.split('=')[0]}": self.pattern.path}

    def windows(self) -> tuple[int, int]:
        if self.pattern is None:
            raise KvbenchError("method=duo_attention: the head patterns are not loaded (bind the method to the model)")
        sink = self.pattern.sink_size if self.sink_arg is None else int(self.sink_arg)
        recent = self.pattern.recent_size if self.recent_arg is None else int(self.recent_arg)
        return sink, recent


@register_scorer("duo_attention")
class DuoAttentionScorer(_Patterned, Scorer):
    """The within-head order of a streaming head: the ``sink_size`` first tokens, then the most recent."""

    PRESETS = {"kvpress": {"allocator": {"budget": "heads"}, **KVPRESS_BUDGET}}

    def __init__(self, patterns: str | None = None, sink_size: NonNegative | None = None,
                 recent_size: NonNegative | None = None):
        self._init_pattern(patterns, sink_size, recent_size, "scorer")

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        self.bind_model(model)  # a library user's prefill binds it too
        return super().prefill_patch(model, keep_ratio)

    def row_extras(self) -> dict[str, Any]:
        sink, recent = self.windows()
        return {"duo_patterns": self.pattern.source, "duo_sink": sink, "duo_recent": recent}

    def score(self, inputs: LayerInputs) -> Tensor:
        sink, _ = self.windows()
        batch, n_kv, n_tokens, _ = inputs.keys.shape
        order = torch.arange(n_tokens, device=inputs.keys.device, dtype=torch.float32)
        order[: min(sink, n_tokens)] += n_tokens  # sinks above every recent token
        return order.expand(batch, n_kv, n_tokens)


def duo_budgets(head_scores: Tensor, n_tokens: list[int], keep_ratio: float, sink: int, recent: int,
                budget: str = "memory", rule: str = "floor") -> Tensor:
    """Budgets ``[L, H]``: retrieval heads ``T_l``, streaming heads ``min(T_l, sink + recent)``; the streaming
    heads are the lowest-scored (stable order: ties go to the lower (layer, head) index). ``heads``:
    ``round(n_heads * (1 - keep))`` of them (kvpress). ``memory``: as many as the uniform total needs, the last
    one partly, windows shrunk when all of them are not enough; the total is then exactly the uniform one."""
    n_layers, n_heads = head_scores.shape
    sizes = torch.tensor(n_tokens, dtype=torch.long)[:, None].expand(n_layers, n_heads)
    windows = sizes.clamp(max=sink + recent)
    budgets = sizes.contiguous().clone()
    order = head_scores.flatten().argsort(stable=True).tolist()
    if budget == "heads":
        from harness.compress import kept_fraction

        n_streaming = round(n_layers * n_heads * (1.0 - kept_fraction(keep_ratio, rule)))  # kvpress: round(size * hcr)
        for idx in order[:n_streaming]:
            budgets.view(-1)[idx] = windows.reshape(-1)[idx]
        return budgets
    target = sum(n_heads * n_keep(t, keep_ratio, rule) for t in n_tokens)
    total = int(budgets.sum())
    for idx in order:
        if total <= target:
            break
        cut = int(sizes.reshape(-1)[idx] - windows.reshape(-1)[idx])
        take = min(cut, total - target)
        budgets.view(-1)[idx] -= take
        total -= take
    if total > target:  # every head streams and the windows still hold more than the total: shrink them alike
        ideal = windows.double() * (target / float(windows.sum()))
        budgets = round_to_total(ideal, target, 1, windows).reshape(n_layers, n_heads)
    return budgets


@register_allocator("duo_attention")
class DuoAttentionAllocator(_Patterned, Allocator):
    per_head_budgets = True  # retrieval and streaming heads keep different counts, in any layer
    per_layer_budgets = True

    def __init__(self, patterns: str | None = None, sink_size: NonNegative | None = None,
                 recent_size: NonNegative | None = None, budget: Literal["memory", "heads"] = "memory"):
        self._init_pattern(patterns, sink_size, recent_size, "allocator")
        self.budget = budget

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        if self.pattern is None:
            raise KvbenchError("method=duo_attention: the head patterns are not loaded (bind the method to the model)")
        n_heads = scores[0].shape[-2]
        if tuple(self.pattern.scores.shape) != (len(scores), n_heads):
            raise KvbenchError(f"{self.where} holds head scores for {tuple(self.pattern.scores.shape)} (layers, KV heads); "
                               f"this run scores {len(scores)} x {n_heads}: profile it with {COMMAND}")
        sink, recent = self.windows()
        return duo_budgets(self.pattern.scores, [int(s.shape[-1]) for s in scores], keep_ratio, sink, recent,
                           self.budget, self.budget_rule)


# --------------------------------------------------------------------------------------------------------------
# The command: python -m methods.duo_attention


class Options(BaseModel):
    """The command's own keys (from the command line as text)."""
    model_config = ConfigDict(extra="forbid")
    out: Annotated[str, Field(min_length=1)]
    steps: Count = 300
    lr: Annotated[float, Field(gt=0)] = 0.02
    reg: Annotated[float, Field(ge=0)] = 0.05
    sink_size: NonNegative = DEFAULT_SINK
    recent_size: Count = DEFAULT_RECENT
    task: Literal["random"] | None = None


def run(argv: list[str]) -> str:
    import datetime

    from harness.models import model_identity
    from methods._calibration import prepare, provenance

    if not any(a.startswith("out=") for a in argv):
        raise KvbenchError("out=<dir> is required (where full_attention_heads.tsv and config.json are written)")
    cal = prepare(argv, Options)
    o = cal.own
    prompts = cal.prompts
    if cal.source == "random":  # random ids hold no passkey: make them passkey prompts in id space
        vocab = int(getattr(getattr(cal.model.config, "text_config", cal.model.config), "vocab_size"))
        prompts = passkey_prompts(vocab, len(prompts), int(cal.cfg.context_length), int(cal.cfg.seed))
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    scores = profile(cal.model, prompts, o["steps"], o["sink_size"], o["recent_size"], o["lr"], o["reg"],
                     int(cal.cfg.seed), log)
    meta = {"sink_size": o["sink_size"], "recent_size": o["recent_size"], "lr": o["lr"], "reg_weight": o["reg"],
            "num_steps": o["steps"], "supervision": "distill", "initial_value": 1.0,
            "dataset_format": "random-id passkeys" if cal.source == "random" else cal.source,
            "kvbench_model": {**model_identity(cal.model), "model": cal.meta["model"]},
            "kvbench": {k: v for k, v in cal.meta.items() if k != "model"},
            **provenance("python -m methods.duo_attention", argv, "kvbench_command")}
    path = save_pattern(o["out"], scores, meta)
    share = float((scores >= 0.5).double().mean())
    return (f"{path}: {scores.shape[0]} layers x {scores.shape[1]} KV heads, {share:.0%} at >= 0.5 after {o['steps']} "
            f"steps on {len(prompts)} {cal.source} prompts")


def main(argv: list[str] | None = None) -> None:
    from methods._calibration import main as command

    command("python -m methods.duo_attention", __doc__, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
