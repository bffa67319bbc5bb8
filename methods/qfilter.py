"""Q-Filters ("Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression", Godey et al.,
arXiv:2503.02812): attention-free, context-agnostic scores from one direction per KV head.

* **Filters**: for each (layer, KV head), the first right singular vector ``u`` of the matrix of calibration
  queries (post-RoPE, every query head of the KV head's group, every position), oriented so that the mean query
  projects positively on it. Queries are anisotropic along ``u``, so the expected logit a key receives,
  ``E_q[<q, k>] = <E[q], k>``, grows with ``<k, u>``.
* **Score** of cached token ``j``: ``-<f, k_j>`` with the stored filter ``f``; kvpress's ``QFilterPress`` (written
  by the paper's authors) scores with that sign and the published filters (``nthngdy/<model>_qfilt``) are stored
  as ``f = -u``, so our calibration stores ``-u`` too and one scoring rule serves both kinds of file. Keys after
  RoPE, as they sit in the cache; no sinks or window of its own; uniform budgets.

Files (``method.scorer.filters=<path>``): a safetensors file holding one tensor ``q_filters [n_layers,
n_kv_heads, head_dim]``, the published filters' format (``QFilters`` of github.com/NathanGodey/qfilters, a
``PyTorchModelHubMixin``: a hub snapshot directory holding ``model.safetensors`` may be given as the path). Our
files add metadata (``format``, the model's identity, calibration task and size), checked against the model.
``python -m methods.qfilter model=<model> task=<task> n_samples=<n> context_length=<T> out=<file>`` computes them
from kvbench's generated calibration data (no download); ``filters: null`` (the default) uses the reference
model's shipped file (``SHIPPED``) on the reference model and, for any other model, filters calibrated when the
model is bound on ``ON_THE_FLY`` random-id contexts (the paper reports the filters robust to the calibration
data; a file made with the command on real prompts is the better choice).

Our defaults are kvpress's (the authors' own implementation), so ``method.preset=kvpress`` only switches the
counts to kvpress's. The only difference is where the filters come from: kvpress downloads them from the hub.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from harness.compress import KVPRESS_COUNTS_ONLY, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.paths import check_tensors, find_input, read_safetensors

FORMAT = "kvbench-qfilters/1"
TENSOR = "q_filters"
HUB_FILE = "model.safetensors"  # the file of a published filter's hub snapshot (PyTorchModelHubMixin)
SHIPPED = "harness/reference/qfilters.safetensors"  # the reference model's, made by this module's command
ON_THE_FLY = {"n": 4, "length": 512, "seed": 0}  # random-id calibration when no file is given and none is shipped
COMMAND = "python -m methods.qfilter model=<model> out=<file.safetensors>"

# --------------------------------------------------------------------------------------------------------------
# Files


def resolve(path: str | Path) -> Path:
    """The filter file: the path (working dir, then repository), or ``model.safetensors`` inside a directory."""
    found = find_input(path) or Path(path).expanduser()
    return found / HUB_FILE if found.is_dir() else found


def load_filters(path: str | Path, where: str = "method.scorer.filters") -> tuple[Tensor, dict[str, Any]]:
    """``(filters [L, H_kv, D] float32, metadata)``; a missing, foreign or damaged file is a one-line error."""
    path = resolve(path)
    where = f"{where}={str(path)!r}"
    hint = f"give a Q-Filters file (one tensor {TENSOR} [n_layers, n_kv_heads, head_dim]) or make one with {COMMAND}"
    if not path.is_file():
        raise KvbenchError(f"{where} does not exist or is not a file; {hint}")
    tensors, raw = read_safetensors(path, hint)
    check_tensors(tensors, {TENSOR: None}, where, hint)
    filters = tensors[TENSOR]
    if filters.dim() != 3 or 0 in filters.shape or not filters.is_floating_point():
        raise KvbenchError(f"{where}: {TENSOR} is {filters.dtype} {tuple(filters.shape)}, not a float tensor "
                           f"[n_layers, n_kv_heads, head_dim]; {hint}")
    if not torch.isfinite(filters).all():
        raise KvbenchError(f"{where}: {TENSOR} holds non-finite values; {hint}")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    return filters.float().contiguous(), meta


def save_filters(path: str | Path, filters: Tensor, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from harness.io import atomic_save

    path = Path(path)
    text = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    tensors = {TENSOR: filters.float().contiguous()}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=text))
    return path


def check_filters(filters: Tensor, meta: dict[str, Any], model: nn.Module, where: str) -> None:
    """Refuse filters made for another model: the shape always, our files' recorded identity too."""
    from harness.models import check_model_identity, model_identity

    facts = model_identity(model)
    shape = (facts["n_layers"], facts["n_kv_heads"], facts["head_dim"])
    if tuple(filters.shape) != shape:
        raise KvbenchError(f"{where} holds filters for {tuple(filters.shape)[0]} layers x {tuple(filters.shape)[1]} KV "
                           f"heads x head_dim {tuple(filters.shape)[2]}; this model has {shape[0]} x {shape[1]} x "
                           f"{shape[2]}: make its filters with {COMMAND}")
    if meta.get("format") == FORMAT:
        check_model_identity(meta, model, f"{where} was calibrated for model {meta.get('model', '?')!r}",
                             f"make this model's filters with {COMMAND}", name=str(meta.get("model") or "") or None)


# --------------------------------------------------------------------------------------------------------------
# Calibration


class _QueryStats:
    """Per (layer, KV head): ``sum q q^T`` and ``sum q`` over the queries of the head's group, every position."""

    def __init__(self):
        self.gram: dict[int, Tensor] = {}
        self.total: dict[int, Tensor] = {}

    def __call__(self, module, query, key, value, scaling):
        from methods._calibration import causal_attention

        batch, n_q, _, dim = query.shape
        n_kv = key.shape[1]
        q = query.detach().double().reshape(batch, n_kv, n_q // n_kv, -1, dim).transpose(0, 1).reshape(n_kv, -1, dim)
        layer = module.layer_idx
        gram, total = q.transpose(1, 2) @ q, q.sum(dim=1)
        self.gram[layer] = gram if layer not in self.gram else self.gram[layer] + gram
        self.total[layer] = total if layer not in self.total else self.total[layer] + total
        return causal_attention(query, key, value, scaling)

    def filters(self) -> Tensor:
        """``[L, H_kv, D]``: ``-u`` per head, ``u`` the top eigenvector of ``Q^T Q`` (the first right singular
        vector of ``Q``) with ``<sum q, u> >= 0``."""
        out = []
        for layer in sorted(self.gram):
            _, vecs = torch.linalg.eigh(self.gram[layer])  # ascending eigenvalues: the last column is the top one
            u = vecs[..., -1]  # [H_kv, D]
            sign = torch.where((self.total[layer] * u).sum(-1) < 0, -1.0, 1.0).to(u.dtype)
            out.append(-(u * sign[:, None]))
        return torch.stack(out).float()


@torch.no_grad()
def calibrate(model: nn.Module, prompts: list[list[int]]) -> Tensor:
    """Filters ``[L, H_kv, D]`` from the queries of a full-attention prefill of each prompt."""
    from methods._calibration import attention_function

    stats = _QueryStats()
    with attention_function(model, stats):
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            model(input_ids=x, position_ids=torch.arange(len(ids), device=model.device)[None], use_cache=False,
                  logits_to_keep=1)
    return stats.filters()


_MEMO: dict[tuple, tuple[Tensor, str, Path | None]] = {}


def default_filters(model: nn.Module) -> tuple[Tensor, str, Path | None]:
    """``(filters, source, file)`` for ``filters: null``: the shipped file where it was made for this model, else
    filters calibrated now on random ids (once per model in a process)."""
    from harness.models import model_identity

    facts = model_identity(model)
    key = (facts["config_hash"], round(facts["fingerprint"], 3))
    if key not in _MEMO:
        shipped = resolve(SHIPPED)
        try:
            filters, meta = load_filters(shipped)
            check_filters(filters, meta, model, "shipped")
            _MEMO[key] = (filters, f"shipped ({SHIPPED})", shipped)
        except KvbenchError:
            vocab = int(getattr(getattr(model.config, "text_config", model.config), "vocab_size"))
            from methods._calibration import random_prompts

            prompts = random_prompts(vocab, ON_THE_FLY["n"], ON_THE_FLY["length"], ON_THE_FLY["seed"])
            _MEMO[key] = (calibrate(model, prompts), "calibrated at load on {n} random-id contexts of {length} "
                          "tokens (seed {seed})".format(**ON_THE_FLY), None)
    return _MEMO[key]


# --------------------------------------------------------------------------------------------------------------
# The scorer


@register_scorer("qfilter")
class QFilterScorer(Scorer):
    PRESETS = KVPRESS_COUNTS_ONLY  # the authors' kvpress press is the reference: preset=kvpress sets its counts

    def __init__(self, filters: str | None = None):
        self.filters_arg = filters
        self.path: Path | None = None
        self.filters: Tensor | None = None
        self.meta: dict[str, Any] = {}
        self.source = ""
        self._bound: set[int] = set()
        if filters:
            self.path = resolve(str(filters))
            self.filters, self.meta = load_filters(self.path)
            self.source = str(filters)

    @property
    def where(self) -> str:
        return f"method.scorer.filters={str(self.filters_arg)!r}"

    def input_files(self) -> dict[str, Path]:
        return {"method.scorer.filters": self.path} if self.path is not None else {}

    def bind_model(self, model: nn.Module) -> None:
        """Refuse filters of another model; with ``filters: null``, take the shipped ones or calibrate now."""
        if id(model) in self._bound:
            return
        if self.filters_arg:
            check_filters(self.filters, self.meta, model, self.where)
        else:
            self.filters, self.source, self.path = default_filters(model)
        self._bound.add(id(model))

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        self.bind_model(model)  # a library user's prefill binds it too
        return super().prefill_patch(model, keep_ratio)

    def row_extras(self) -> dict[str, Any]:
        return {"qfilters": self.source}

    def score(self, inputs: LayerInputs) -> Tensor:
        if self.filters is None:
            raise KvbenchError("method=qfilter: the filters are not loaded (bind the method to the model first)")
        n_kv = inputs.keys.shape[1] if inputs.kv_head is None else self.filters.shape[1]
        if self.filters.shape[0] != inputs.n_layers or self.filters.shape[1:] != (n_kv, inputs.keys.shape[3]):
            raise KvbenchError(f"{self.where} holds filters of shape {tuple(self.filters.shape)}; this model's keys "
                               f"are {inputs.n_layers} layers x {tuple(inputs.keys.shape[1:2] + inputs.keys.shape[3:])}")
        f = self.filters[inputs.layer_idx].to(inputs.keys.device, inputs.keys.dtype)[None, :, None, :]
        if inputs.kv_head is not None:  # one head of a ragged layer (decode-time compression)
            f = f[:, inputs.kv_head: inputs.kv_head + 1]
        return -(f * inputs.keys).sum(dim=-1)


# --------------------------------------------------------------------------------------------------------------
# The command: python -m methods.qfilter


class Options(BaseModel):
    """The command's own keys (from the command line as text)."""
    model_config = ConfigDict(extra="forbid")
    out: Annotated[str, Field(min_length=1)]
    task: Literal["random"] | None = None


def run(argv: list[str]) -> str:
    from methods._calibration import prepare, provenance

    if not any(a.startswith("out=") for a in argv):
        raise KvbenchError("out=<file.safetensors> is required (where the filters are written)")
    cal = prepare(argv, Options)
    from harness.models import model_identity

    filters = calibrate(cal.model, [ctx + future for ctx, future in cal.prompts])
    meta = {**cal.meta, **model_identity(cal.model), "n_layers": filters.shape[0], "n_kv_heads": filters.shape[1],
            "head_dim": filters.shape[2], "queries": "post-RoPE, every position of context + question + answer",
            "sign": "filter = -u (u: first right singular vector, mean query projection >= 0); score = -<filter, k>",
            **provenance("python -m methods.qfilter", argv)}
    path = save_filters(cal.own["out"], filters, meta)
    return (f"{path}: Q-Filters {tuple(filters.shape)} from {len(cal.prompts)} {cal.source} samples of "
            f"{cal.meta['context_length']} tokens")


def main(argv: list[str] | None = None) -> None:
    from methods._calibration import main as command

    command("python -m methods.qfilter", __doc__, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
