"""Fast KVzip ("Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction", Kim, Han and Yun,
arXiv:2601.17668): a small gate per layer predicts KVzip's score of each token from its hidden state (the
attention block's input), so the reconstruction forwards of KVzip (methods/kvzip.py) are not needed.

The gate (a "low-rank sink attention"; kvpress's ``FastKVzipGate``): per KV head, a ``dim``-sized key
``k = RMSNorm(W_k h)`` and, per query of its group, ``q_g = RMSNorm(W_q h)_g``; with ``sink`` learned base keys
``c_s`` and a bias ``b_g``,

    gate_g(h) = 1 / (1 + sum_s exp(<c_s, q_g> / sqrt(dim) - <k, q_g> / sqrt(dim) - b_g)),   score = mean_g gate_g

(a softmax of the token's own key against the sink keys: the share of attention it would keep). Training
distils KVzip scores with a binary cross-entropy (the official optim.py's ``cnt`` loss: mean over tokens, summed
over heads and layers), SGD with momentum 0.9, lr 0.2 with the official warm-up and step schedule.

Eviction, as kvpress 0.5.5's ``FastKVzipPress`` (defaults): the first 4 tokens and a local window of the last
``max(1, int(T * window_ratio))`` tokens (``window_size`` from ``window_threshold`` = 32000 tokens on) are always
kept, then one top-k over every layer and head (allocator ``global``). Our defaults are kvpress's (the authors
wrote that press), so ``method.preset=kvpress`` only switches the counts; the official code keeps the system
prompt rather than 4 tokens, and its own window during its chunked prefill, which kvbench does not run.

Gates (``method.scorer.gates=<file>``): a safetensors file of ``layers.<i>.{q_proj.weight, q_proj.bias,
k_proj.weight, q_norm.weight, k_norm.weight, k_base, b}`` (the official state dicts' names and shapes, one per
layer; ``sink`` = ``k_base``'s third dimension); our files record the model's identity, checked against the model.
The published gates (``Jang-Hyun/Fast-KVzip``, pickled ``.pt``) are not read: kvbench runs no pickle loader; a
``.pt`` converted elsewhere (its ``"module"`` list of state dicts, read with torch's weights-only loader, saved under
these names as safetensors) is.
``python -m methods.fastkvzip model=<model> task=<task> n_samples=<n> context_length=<T> out=<file>`` trains
gates from KVzip scores of kvbench's generated prompts (no download). ``gates: null``: the reference model's
shipped gates (``SHIPPED``) on the reference model, for any other model gates trained when the model is bound on
``ON_THE_FLY`` random-id contexts (short; a file made with the command on real prompts is the better choice).
The official training script adds ``b`` twice to the logit (its inference once); we add it once in both.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.paths import find_input
from harness.schema import Count, Fraction

SHIPPED = "harness/reference/fastkvzip.safetensors"  # the reference model's gates, made by this module's command
ON_THE_FLY = {"n": 4, "length": 512, "seed": 0, "tokens": 256, "steps": 200}
COMMAND = "python -m methods.fastkvzip model=<model> out=<file.safetensors>"
FORMAT = "kvbench-fastkvzip-1"
NAMES = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "q_norm.weight", "k_norm.weight", "k_base", "b")


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm (the gate's q_norm / k_norm): ``w * x / sqrt(mean(x^2) + eps)`` in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Gate(nn.Module):
    """One layer's gate: ``[T, hidden] -> [H_kv, T]`` scores in (0, 1)."""

    def __init__(self, input_dim: int, n_heads: int, group: int, dim: int = 16, sink: int = 16):
        super().__init__()
        self.n_heads, self.group, self.dim, self.sink = n_heads, group, dim, sink
        self.q_proj = nn.Linear(input_dim, n_heads * group * dim, bias=True)
        self.k_proj = nn.Linear(input_dim, n_heads * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim), RMSNorm(dim)
        self.k_base = nn.Parameter(torch.zeros(n_heads, 1, sink, dim))
        self.b = nn.Parameter(torch.zeros(n_heads, 1, group))

    def forward(self, h: Tensor) -> Tensor:
        n = h.shape[0]
        q = self.q_norm(self.q_proj(h).view(n, self.n_heads, self.group, self.dim)).permute(1, 0, 3, 2)  # [H,T,d,g]
        k = self.k_norm(self.k_proj(h).view(n, self.n_heads, 1, self.dim)).transpose(0, 1)  # [H, T, 1, d]
        own = (k @ q) / math.sqrt(self.dim) + self.b[:, :, None]  # [H, T, 1, g]
        base = (self.k_base @ q) / math.sqrt(self.dim)  # [H, T, sink, g]
        gate = 1.0 / (1.0 + torch.exp(base - own).sum(2, keepdim=True))
        return gate.mean(-1)[..., 0]  # [H, T]


def gates_for(shapes: dict[str, tuple[int, ...]], n_layers: int) -> list[Gate]:
    """Gates of the dimensions a file's layer-0 tensors imply."""
    hgd, input_dim = shapes["q_proj.weight"]
    n_heads, _, sink, dim = shapes["k_base"]
    return [Gate(input_dim, n_heads, hgd // (n_heads * dim), dim, sink) for _ in range(n_layers)]


def load_gates(path: str | Path, where: str = "method.scorer.gates") -> tuple[list[Gate], dict[str, Any]]:
    """``(gates, metadata)``; a missing, foreign or damaged file is a one-line error."""
    from harness.paths import check_tensors, read_safetensors

    p = find_input(path) or Path(path).expanduser()
    hint = f"make one with {COMMAND}"
    if not p.is_file():
        raise KvbenchError(f"{where}={str(path)!r} does not exist or is not a file; {hint}")
    if p.suffix == ".pt":
        raise KvbenchError(f"{where}={str(path)!r} is a pickled .pt (the published format); kvbench runs no pickle "
                           "loader: convert it to safetensors with the names in methods/fastkvzip.py first")
    tensors, meta = read_safetensors(p, hint)
    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layers.") and k.split(".")[1].isdigit()})
    if not layers or layers != list(range(len(layers))) or any(f"layers.0.{n}" not in tensors for n in ("q_proj.weight", "k_base")):
        raise KvbenchError(f"{p}: not a FastKVzip gate file (layers.<i>.q_proj.weight, ... k_base, b); {hint}")
    shapes = {n: tuple(tensors[f"layers.0.{n}"].shape) for n in ("q_proj.weight", "k_base")}
    if len(shapes["q_proj.weight"]) != 2 or len(shapes["k_base"]) != 4:
        raise KvbenchError(f"{p}: layers.0 q_proj.weight {shapes['q_proj.weight']} / k_base {shapes['k_base']} are not "
                           f"a gate's [H*g*dim, hidden] / [H, 1, sink, dim]; {hint}")
    gates = gates_for(shapes, len(layers))
    want = {f"layers.{i}.{k}": tuple(v.shape) for i, g in enumerate(gates) for k, v in g.state_dict().items()}
    check_tensors(tensors, want, str(p), hint)
    for i, g in enumerate(gates):
        g.load_state_dict({k: tensors[f"layers.{i}.{k}"].float() for k in g.state_dict()})
        if not all(bool(torch.isfinite(t).all()) for t in g.parameters()):
            raise KvbenchError(f"{p}: layer {i} holds non-finite weights; {hint}")
    return [g.eval() for g in gates], {k: _parse(v) for k, v in meta.items()}


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


def save_gates(path: str | Path, gates: list[Gate], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from harness.io import atomic_save

    path = Path(path)
    tensors = {f"layers.{i}.{k}": v.detach().float().contiguous() for i, g in enumerate(gates)
               for k, v in g.state_dict().items()}
    text = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=text))
    return path


def check_gates(gates: list[Gate], meta: dict[str, Any], model: nn.Module, where: str) -> None:
    from harness.models import check_model_identity, model_identity

    facts = model_identity(model)
    g = gates[0]
    have = (len(gates), g.q_proj.in_features, g.n_heads, g.n_heads * g.group)
    want = (facts["n_layers"], facts["hidden_size"], facts["n_kv_heads"], facts["n_heads"])
    if have != want:
        raise KvbenchError(f"{where} holds gates for {have[0]} layers, hidden {have[1]}, {have[2]} KV / {have[3]} query "
                           f"heads; this model has {want[0]}, {want[1]}, {want[2]} / {want[3]}: make its gates with {COMMAND}")
    if meta.get("format") == FORMAT:
        check_model_identity(meta, model, f"{where} was trained for model {meta.get('model', '?')!r}",
                             f"make this model's gates with {COMMAND}", name=str(meta.get("model") or "") or None)


# --------------------------------------------------------------------------------------------------------------
# Training (the official optim.py's recipe)


def lr_factor(step: int, steps: int) -> float:
    """The official schedule: warm-up over the first 1 %, then 1, 0.5 from half way, 0.25 from three quarters."""
    if step < 0.01 * steps:
        return 0.01 * step
    if step >= 0.75 * steps:
        return 0.25
    if step >= 0.5 * steps:
        return 0.5
    return 1.0


def fit_gates(x: Tensor, y: Tensor, group: int, dim: int = 16, sink: int = 16, steps: int = 5000,
              batch_size: int = 1000, lr: float = 0.2, seed: int = 0) -> list[Gate]:
    """Gates for ``x [N, L, hidden]`` -> KVzip scores ``y [N, L, H]`` (BCE, SGD momentum 0.9)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n, n_layers, input_dim = x.shape
    gates = nn.ModuleList(Gate(input_dim, y.shape[2], group, dim, sink) for _ in range(n_layers))
    opt = torch.optim.SGD(gates.parameters(), lr=lr, momentum=0.9)
    target = y.clamp(0.0, 1.0)
    order = torch.randperm(n, generator=gen)
    n_split = max(1, n // batch_size)
    for step in range(steps):
        split = step % n_split
        if split == 0 and step:
            order = torch.randperm(n, generator=gen)
        idx = order[split * batch_size:(split + 1) * batch_size]
        loss = 0.0
        for layer, gate in enumerate(gates):
            pred = gate(x[idx, layer])  # [H, b]
            loss = loss + nn.functional.binary_cross_entropy(pred.clamp(1e-7, 1 - 1e-7), target[idx, layer].T,
                                                             reduction="none").mean(-1).sum()
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [g.eval() for g in gates]


def train(model: nn.Module, prompts: list[list[int]], tokenizer=None, n_tokens: int | None = None, seed: int = 0,
          **fit: Any) -> tuple[list[Gate], dict[str, float]]:
    """Gates for ``model`` from KVzip scores of ``prompts``; also the held-out BCE and rank correlation."""
    from methods._kvzip_data import collect, spearman, split

    text = getattr(model.config, "text_config", model.config)
    group = int(text.num_attention_heads) // int(text.num_key_value_heads)
    x, y = collect(model, prompts, tokenizer, plus=False, n_tokens=n_tokens, seed=seed)
    tr, te = split(x.shape[0])
    gates = fit_gates(x[tr], y[tr], group, seed=seed, **fit)
    with torch.no_grad():
        pred = torch.stack([g(x[te, i]).T for i, g in enumerate(gates)], dim=1)  # [n, L, H]
        bce = float(nn.functional.binary_cross_entropy(pred.clamp(1e-7, 1 - 1e-7), y[te].clamp(0, 1)))
    return gates, {"n_train": int(tr.numel()), "n_test": int(te.numel()), "test_bce": bce,
                   "test_spearman": spearman(pred, y[te])}


_MEMO: dict[tuple, tuple[list[Gate], str, Path | None]] = {}


def default_gates(model: nn.Module) -> tuple[list[Gate], str, Path | None]:
    from harness.models import model_identity

    facts = model_identity(model)
    key = (facts["config_hash"], round(facts["fingerprint"], 3))
    if key not in _MEMO:
        shipped = find_input(SHIPPED) or Path(SHIPPED)
        try:
            gates, meta = load_gates(shipped, "shipped")
            check_gates(gates, meta, model, "shipped")
            _MEMO[key] = (gates, f"shipped ({SHIPPED})", shipped)
        except KvbenchError:
            from methods._calibration import random_prompts

            vocab = int(getattr(getattr(model.config, "text_config", model.config), "vocab_size"))
            prompts = random_prompts(vocab, ON_THE_FLY["n"], ON_THE_FLY["length"], ON_THE_FLY["seed"])
            gates, _ = train(model, prompts, n_tokens=ON_THE_FLY["tokens"], seed=ON_THE_FLY["seed"],
                             steps=ON_THE_FLY["steps"])
            _MEMO[key] = (gates, "trained at load on {n} random-id contexts of {length} tokens, {steps} steps "
                          "(seed {seed})".format(**ON_THE_FLY), None)
    return _MEMO[key]


# --------------------------------------------------------------------------------------------------------------
# The scorer


def local_window(n_tokens: int, window_ratio: float, window_size: int, threshold: int) -> int:
    """kvpress's local window: ``max(1, int(T * ratio))`` below ``threshold`` tokens, ``window_size`` from it on."""
    return max(1, int(n_tokens * window_ratio)) if n_tokens < threshold else window_size


@register_scorer("fastkvzip")
class FastKVzipScorer(Scorer):
    needs_hidden_states = True
    PRESETS = KVPRESS_COUNTS_ONLY  # the authors' kvpress press is the reference: preset=kvpress sets its counts

    def __init__(self, gates: str | None = None, window_ratio: Fraction = 0.02, window_size: Count = 4096,
                 window_threshold: Count = 32000):
        self.gates_arg = gates
        self.window_ratio, self.window_size = float(window_ratio), int(window_size)
        self.window_threshold = int(window_threshold)
        self.gates: list[Gate] | None = None
        self.meta: dict[str, Any] = {}
        self.path: Path | None = None
        self.source = ""
        self._bound: set[int] = set()
        if gates:
            self.path = find_input(str(gates)) or Path(str(gates)).expanduser()
            self.gates, self.meta = load_gates(self.path)
            self.source = str(gates)

    @property
    def where(self) -> str:
        return f"method.scorer.gates={str(self.gates_arg)!r}"

    def input_files(self) -> dict[str, Path]:
        return {"method.scorer.gates": self.path} if self.path is not None else {}

    def bind_model(self, model: nn.Module) -> None:
        if id(model) in self._bound:
            return
        if self.gates_arg:
            check_gates(self.gates, self.meta, model, self.where)
        else:
            self.gates, self.source, self.path = default_gates(model)
        self._bound.add(id(model))

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        self.bind_model(model)
        return super().prefill_patch(model, keep_ratio)

    def row_extras(self) -> dict[str, Any]:
        return {"fastkvzip": self.source}

    def score(self, inputs: LayerInputs) -> Tensor:
        if self.gates is None:
            raise KvbenchError("method=fastkvzip: the gates are not loaded (bind the method to the model first)")
        h = inputs.hidden_states[0].float()
        gate = self.gates[inputs.layer_idx].to(h.device)
        with torch.no_grad():
            scores = gate(h)[None]  # [1, H, T]
        window = local_window(scores.shape[-1], self.window_ratio, self.window_size, self.window_threshold)
        scores[..., -window:] = math.inf  # kvpress: 1.0, above every gate value (< 1)
        return scores


# --------------------------------------------------------------------------------------------------------------
# The command: python -m methods.fastkvzip


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: Annotated[str, Field(min_length=1)]
    task: Literal["random"] | None = None
    tokens: Annotated[int, Field(ge=1)] | None = None  # positions per prompt (null: all; the official code: all)
    steps: Annotated[int, Field(ge=1)] = 5000
    batch_size: Annotated[int, Field(ge=1)] = 1000
    lr: Annotated[float, Field(gt=0)] = 0.2
    dim: Annotated[int, Field(ge=1)] = 16
    sink: Annotated[int, Field(ge=1)] = 16


def run(argv: list[str]) -> str:
    from harness.models import model_identity
    from methods._calibration import prepare, provenance

    if not any(a.startswith("out=") for a in argv):
        raise KvbenchError("out=<file.safetensors> is required (where the gates are written)")
    cal = prepare(argv, Options)
    o = cal.own
    prompts = [ctx for ctx, _ in cal.prompts]
    gates, stats = train(cal.model, prompts, cal.tokenizer, o["tokens"], int(cal.cfg.seed), steps=o["steps"],
                         batch_size=o["batch_size"], lr=o["lr"], dim=o["dim"], sink=o["sink"])
    meta = {**cal.meta, **model_identity(cal.model), **stats,
            "target": "KVzip score (methods/kvzip.py defaults)", "steps": o["steps"],
            **provenance("python -m methods.fastkvzip", argv)}
    path = save_gates(o["out"], gates, meta)
    return (f"{path}: FastKVzip gates from {stats['n_train']} positions of {len(prompts)} {cal.source} prompts; "
            f"held-out BCE {stats['test_bce']:.4f}, rank correlation {stats['test_spearman']:.3f}")


def main(argv: list[str] | None = None) -> None:
    from methods._calibration import main as command

    command("python -m methods.fastkvzip", __doc__, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
