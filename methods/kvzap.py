"""KVzap ("KVzap: Fast, Adaptive, and Faithful KV Cache Pruning", Jegou et al., arXiv:2601.07891): a small
learned model per layer (linear, or a 2-layer MLP with GELU) maps each token's hidden state (the attention
block's input) to one score per KV head, trained to predict ``log`` of the token's KVzip+ score (KVzip's
reconstruction attention, each row divided by ``||h||`` and each column times ``||W_O v||``; methods/kvzip.py).
No second forward: the score is known as soon as the token is prefilled.

Our defaults are the paper's inference rule: entries whose predicted score falls below one threshold are
pruned, over every layer and head, and a sliding window of the last 128 tokens is always kept (kvpress's
``DMSPress(KVzapPress(), threshold, sliding_window_size=128)``). For a keep ratio that threshold is exactly one
top-k over the whole model: allocator ``global``, with the scorer's ``window: 128`` ranking the last 128 tokens
above every prediction (the most recent highest, so a budget smaller than the window keeps the latest of it
rather than failing). ``method.preset=kvpress`` is kvpress's ``KVzapPress`` alone (a ScorerPress): every head
keeps its own top ``int(T * (1 - cr))``, no window (``window: 0``, allocator ``global`` with ``scope: head``).

Weights (``method.scorer.weights=<dir>``): kvpress's format, the directory ``KVzapModel.save_pretrained`` writes
(``config.json`` with ``input_dim``, ``output_dim``, ``hidden_dim`` (null = linear), ``n_modules``;
``model.safetensors`` with ``layers.<i>.weight`` / ``layers.<i>.{0,2}.weight``), which kvpress loads from the hub
(``nvidia/KVzap-<mlp|linear>-<model>``); our files record the model's identity in ``config.json``'s ``kvbench``
entry, checked against the model. ``python -m methods.kvzap model=<model> task=<task> n_samples=<n>
context_length=<T> out=<dir>`` trains one from KVzip+ scores of kvbench's generated prompts (kvpress's recipe,
kvzap/train.py: MSE, AdamW with a cosine schedule and gradient clipping for the MLP, ridge regression for the
linear model; it trains on a downloaded corpus, we on kvbench's own tasks or random ids). ``weights: null`` (the
default): the reference model's shipped MLP (``SHIPPED``) on the reference model, for any other model a linear
KVzap fitted when the model is bound on ``ON_THE_FLY`` random-id contexts (a file made with the command on real
prompts is the better choice).
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

from harness.compress import KVPRESS_BUDGET, LayerInputs, Scorer, register_scorer
from harness.errors import KvbenchError
from harness.paths import find_input
from harness.schema import NonNegative

SHIPPED = "harness/reference/kvzap"  # the reference model's MLP, made by this module's command
ON_THE_FLY = {"n": 4, "length": 512, "seed": 0, "tokens": 256}  # the linear fit when no file is given or shipped
COMMAND = "python -m methods.kvzap model=<model> out=<dir>"
FORMAT = "kvbench-kvzap-1"


class KVzapNet(nn.Module):
    """kvpress's ``KVzapModel`` layout (state-dict names equal): one module per layer, linear or
    Linear-GELU-Linear, ``[..., hidden] -> [..., H_kv]``."""

    def __init__(self, input_dim: int, output_dim: int, n_modules: int, hidden_dim: int | None = None):
        super().__init__()
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.layers = nn.ModuleList(nn.Linear(input_dim, output_dim) for _ in range(n_modules))
        else:
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(),
                                                      nn.Linear(hidden_dim, output_dim)) for _ in range(n_modules))

    def config(self) -> dict[str, Any]:
        first = self.layers[0] if self.hidden_dim is None else self.layers[0][0]
        last = self.layers[0] if self.hidden_dim is None else self.layers[0][2]
        return {"input_dim": first.in_features, "output_dim": last.out_features, "hidden_dim": self.hidden_dim,
                "n_modules": len(self.layers)}

    def forward(self, x: Tensor) -> Tensor:  # [N, L, hidden] -> [N, L, H]
        return torch.stack([m(x[:, i]) for i, m in enumerate(self.layers)], dim=1)


def resolve(path: str | Path) -> Path:
    return find_input(path, Path.is_dir) or Path(path).expanduser()


def load_kvzap(path: str | Path, where: str = "method.scorer.weights") -> tuple[KVzapNet, dict[str, Any]]:
    """``(net, config.json)`` of a KVzap dir; a missing, foreign or damaged one is a one-line error."""
    from harness.paths import check_tensors, read_json_object, read_safetensors

    d = resolve(path)
    hint = f"make one with {COMMAND}"
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise KvbenchError(f"{where}={str(path)!r} is not a KVzap directory (config.json + model.safetensors); {hint}")
    cfg = read_json_object(d / "config.json", hint)
    dims = {k: cfg.get(k) for k in ("input_dim", "output_dim", "n_modules")}
    hidden = cfg.get("hidden_dim")
    bad = [f"{k}={v!r}" for k, v in {**dims, "hidden_dim": hidden}.items()
           if not (v is None and k == "hidden_dim") and not (type(v) is int and v > 0)]
    if bad:
        raise KvbenchError(f"{d / 'config.json'}: {', '.join(bad)} (positive integers; hidden_dim may be null); {hint}")
    net = KVzapNet(dims["input_dim"], dims["output_dim"], dims["n_modules"], hidden)
    tensors = read_safetensors(d / "model.safetensors", hint)[0]
    check_tensors(tensors, {k: tuple(v.shape) for k, v in net.state_dict().items()}, str(d / "model.safetensors"),
                  f"it does not match its config.json; {hint}")
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise KvbenchError(f"{d / 'model.safetensors'} holds non-finite weights; {hint}")
    return net.eval(), cfg


def save_kvzap(out: str | Path, net: KVzapNet, meta: dict[str, Any]) -> Path:
    """kvpress's layout: ``config.json`` (+ ``model_type: kvzap`` and our ``kvbench`` entry) and
    ``model.safetensors``."""
    from safetensors.torch import save_file

    from harness.io import atomic_save, atomic_write_json

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    atomic_save(d / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(d / "config.json", {"architectures": ["KVzapModel"], "model_type": "kvzap", **net.config(),
                                          "kvbench": {"format": FORMAT, **meta}})
    return d


def check_kvzap(net: KVzapNet, cfg: dict[str, Any], model: nn.Module, where: str) -> None:
    """Refuse weights of another model: the shape always, our files' recorded identity too."""
    from harness.models import check_model_identity, model_identity

    facts = model_identity(model)
    c = net.config()
    want = (facts["hidden_size"], facts["n_kv_heads"], facts["n_layers"])
    if (c["input_dim"], c["output_dim"], c["n_modules"]) != want:
        raise KvbenchError(f"{where} maps hidden {c['input_dim']} to {c['output_dim']} KV heads in {c['n_modules']} "
                           f"layers; this model has {want[0]}, {want[1]}, {want[2]}: make its KVzap with {COMMAND}")
    meta = cfg.get("kvbench")
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        check_model_identity(meta, model, f"{where} was trained for model {meta.get('model', '?')!r}",
                             f"make this model's KVzap with {COMMAND}", name=str(meta.get("model") or "") or None)


# --------------------------------------------------------------------------------------------------------------
# Training (kvpress kvzap/train.py's recipe)


def fit_linear(x: Tensor, y: Tensor, alpha: float = 1.0) -> KVzapNet:
    """Ridge regression per layer (scikit-learn's ``Ridge(alpha)``: centred, the intercept not penalised)."""
    n, n_layers, dim = x.shape
    net = KVzapNet(dim, y.shape[2], n_layers)
    for layer, lin in enumerate(net.layers):
        xs, ys = x[:, layer].double(), y[:, layer].double()
        xm, ym = xs.mean(0), ys.mean(0)
        xc, yc = xs - xm, ys - ym
        w = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(dim, dtype=xs.dtype), xc.T @ yc)  # [dim, H]
        with torch.no_grad():
            lin.weight.copy_(w.T.float())
            lin.bias.copy_((ym - xm @ w).float())
    return net


def fit_mlp(x: Tensor, y: Tensor, hidden_dim: int = 512, epochs: int = 15, lr: float = 5e-3, batch_size: int = 512,
            seed: int = 0) -> KVzapNet:
    """MSE, AdamW, cosine learning rate over ``epochs``, gradient norm clipped at 1 (kvpress's skorch setup)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's initialisation
    net = KVzapNet(x.shape[2], y.shape[2], x.shape[1], hidden_dim)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.mse_loss(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        sched.step()
    return net.eval()


def train(model: nn.Module, prompts: list[list[int]], kind: str = "mlp", tokenizer=None, n_tokens: int | None = 500,
          seed: int = 0, **mlp: Any) -> tuple[KVzapNet, dict[str, float]]:
    """A KVzap for ``model`` from KVzip+ scores of ``prompts``; also the held-out MSE and rank correlation."""
    from methods._kvzip_data import collect, log_scores, spearman, split

    x, raw = collect(model, prompts, tokenizer, plus=True, n_tokens=n_tokens, seed=seed)
    y = log_scores(raw)
    tr, te = split(x.shape[0])
    net = fit_linear(x[tr], y[tr]) if kind == "linear" else fit_mlp(x[tr], y[tr], seed=seed, **mlp)
    with torch.no_grad():
        pred = net(x[te])
    return net, {"n_train": int(tr.numel()), "n_test": int(te.numel()),
                 "test_mse": float(nn.functional.mse_loss(pred, y[te])), "test_spearman": spearman(pred, y[te])}


_MEMO: dict[tuple, tuple[KVzapNet, str, Path | None]] = {}


def default_kvzap(model: nn.Module) -> tuple[KVzapNet, str, Path | None]:
    """``(net, source, dir)`` for ``weights: null``: the shipped one where it was made for this model, else a linear
    KVzap fitted now on random ids (once per model in a process)."""
    from harness.models import model_identity

    facts = model_identity(model)
    key = (facts["config_hash"], round(facts["fingerprint"], 3))
    if key not in _MEMO:
        shipped = resolve(SHIPPED)
        try:
            net, cfg = load_kvzap(shipped, "shipped")
            check_kvzap(net, cfg, model, "shipped")
            _MEMO[key] = (net, f"shipped ({SHIPPED})", shipped)
        except KvbenchError:
            from methods._calibration import random_prompts

            vocab = int(getattr(getattr(model.config, "text_config", model.config), "vocab_size"))
            prompts = random_prompts(vocab, ON_THE_FLY["n"], ON_THE_FLY["length"], ON_THE_FLY["seed"])
            net, _ = train(model, prompts, "linear", n_tokens=ON_THE_FLY["tokens"], seed=ON_THE_FLY["seed"])
            _MEMO[key] = (net, "linear, fitted at load on {n} random-id contexts of {length} tokens "
                          "(seed {seed})".format(**ON_THE_FLY), None)
    return _MEMO[key]


# --------------------------------------------------------------------------------------------------------------
# The scorer


@register_scorer("kvzap")
class KVzapScorer(Scorer):
    needs_hidden_states = True
    PRESETS = {"kvpress": {"scorer": {"window": 0}, "allocator": {"scope": "head"}, **KVPRESS_BUDGET}}

    def __init__(self, weights: str | None = None, window: NonNegative = 128):
        self.weights_arg = weights
        self.window = int(window)
        self.net: KVzapNet | None = None
        self.cfg: dict[str, Any] = {}
        self.path: Path | None = None
        self.source = ""
        self._bound: set[int] = set()
        if weights:
            self.path = resolve(str(weights))
            self.net, self.cfg = load_kvzap(self.path)
            self.source = str(weights)

    @property
    def where(self) -> str:
        return f"method.scorer.weights={str(self.weights_arg)!r}"

    def input_files(self) -> dict[str, Path]:
        return {"method.scorer.weights": self.path / "model.safetensors"} if self.path is not None else {}

    def bind_model(self, model: nn.Module) -> None:
        if id(model) in self._bound:
            return
        if self.weights_arg:
            check_kvzap(self.net, self.cfg, model, self.where)
        else:
            self.net, self.source, self.path = default_kvzap(model)
        self._bound.add(id(model))

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        self.bind_model(model)  # a library user's prefill binds it too
        return super().prefill_patch(model, keep_ratio)

    def row_extras(self) -> dict[str, Any]:
        return {"kvzap": self.source}

    def score(self, inputs: LayerInputs) -> Tensor:
        if self.net is None:
            raise KvbenchError("method=kvzap: the weights are not loaded (bind the method to the model first)")
        h = inputs.hidden_states
        module = self.net.layers[inputs.layer_idx].to(h.device)
        with torch.no_grad():
            scores = module(h.float()).transpose(1, 2)  # [B, T, H] -> [B, H, T]
        w = min(self.window, scores.shape[-1])
        if w:  # DMS's sliding window: above every prediction, the most recent highest (a budget below it keeps those)
            top = float(scores.max())
            scores[..., -w:] = top + 1.0 + torch.arange(w, device=scores.device, dtype=scores.dtype)
        return scores


# --------------------------------------------------------------------------------------------------------------
# The command: python -m methods.kvzap


class Options(BaseModel):
    """The command's own keys (from the command line as text)."""
    model_config = ConfigDict(extra="forbid")
    out: Annotated[str, Field(min_length=1)]
    task: Literal["random"] | None = None
    kind: Literal["mlp", "linear"] = "mlp"
    tokens: Annotated[int, Field(ge=1)] = 500  # positions per prompt (kvpress: 500)
    hidden_dim: Annotated[int, Field(ge=1)] = 512
    epochs: Annotated[int, Field(ge=1)] = 15
    lr: Annotated[float, Field(gt=0)] = 5e-3
    batch_size: Annotated[int, Field(ge=1)] = 512


def run(argv: list[str]) -> str:
    from harness.models import model_identity
    from methods._calibration import prepare, provenance

    if not any(a.startswith("out=") for a in argv):
        raise KvbenchError("out=<dir> is required (where the KVzap config.json + model.safetensors are written)")
    cal = prepare(argv, Options)
    o = cal.own
    prompts = [ctx for ctx, _ in cal.prompts]
    net, stats = train(cal.model, prompts, o["kind"], cal.tokenizer, o["tokens"], int(cal.cfg.seed),
                       **({} if o["kind"] == "linear" else {"hidden_dim": o["hidden_dim"], "epochs": o["epochs"],
                                                          "lr": o["lr"], "batch_size": o["batch_size"]}))
    meta = {**cal.meta, **model_identity(cal.model), **stats, "kind": o["kind"],
            "target": "log KVzip+ score (methods/kvzip.py, kvzip_plus=true, chunk_size 2000)",
            **provenance("python -m methods.kvzap", argv)}
    path = save_kvzap(o["out"], net, meta)
    return (f"{path}: KVzap {o['kind']} from {stats['n_train']} positions of {len(prompts)} {cal.source} prompts; "
            f"held-out MSE {stats['test_mse']:.3f}, rank correlation {stats['test_spearman']:.3f}")


def main(argv: list[str] | None = None) -> None:
    from methods._calibration import main as command

    command("python -m methods.kvzap", __doc__, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
