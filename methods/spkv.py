"""SP-KV, Self-Pruned Key-Value attention ("Self-Pruned Key-Value Attention: Learning When to Write by Predicting
Future Utility", arXiv:2605.14037): a learned gate decides, when a KV entry is written,
whether it will be worth keeping once it leaves the local window.

* Predictor: per (layer, KV head), ``u = sigmoid(w . x + b)`` of each entry, ``x`` the layer's input hidden
  state (``feature: hidden``, the default; the scorer then asks the harness for hidden states) or the
  post-RoPE key (``feature: key``). Trained by ``kvbench-train method=spkv``: during training ``log u`` is
  added to the attention logits of keys outside the local window (``b`` starts at +6 so gates start open),
  with next-token loss (and KL to the ungated model) on the answer. The paper trains the LLM jointly; here the
  model stays frozen by default (comparable with the other methods), ``spkv.train_params`` unfreezes chosen
  model parameters (the checkpoint then carries them and the scorer swaps them in during prefill and decoding).
  Caution, measured on the reference model: with ``train_params=[o_proj]`` (800 steps) the fine-tuned model
  learns to overpower the soft ``log u`` bias with larger attention logits - gates close to 0.2% open while the
  training loss goes to 0 - and under the hard threshold at inference it emits garbage (0 on RULER). Joint
  training needs the hard mask (or a straight-through gate) in the loop; the frozen default has no such gap.
  With a frozen model, next-token loss alone has no reason to close gates, so a small L1 penalty on the gates
  of keys that ever leave the window is added (``spkv.sparsity_weight``; 0 = pure next-token loss). With
  ``spkv.sparsity_target`` set, the penalty is a hinge, ``weight * max(0, mean u - target)``: gates are pushed
  closed only while more than ``target`` of the far gates is open on average, so the learned budget settles near
  the target instead of wherever the L1 pressure and the loss balance.
* Inference: the last ``window`` tokens are always kept; an older entry is kept iff ``u > threshold``
  (0.1, as the public implementation). Scorer ``spkv`` returns ``u`` with the window set to +inf; allocator
  ``spkv`` gives each head exactly as many entries as it has above the threshold, so the selector keeps
  exactly those (ragged heads). The budget is per input: **keep_ratio is ignored** (every ratio gives the
  same row); the achieved share is in the rows' ``kept_tokens / context_tokens`` and in the row extra
  ``spkv_keep_ratio`` (with ``spkv_keep_ratio_by_layer``).
* The gate also shapes attention: during prefill (``prefill_patch``) each query sees its window plus the
  older keys whose gate is open; during decoding (``decode_patch``) each layer becomes a ``GatedLayer`` that
  drops an entry once it leaves the window of the next query with ``u <= threshold``, the new entries' gates
  computed at write time. For a multi-token step (the question fed after compression) the drop is decided
  for the step's first query, so its later queries may still see up to step-length entries that have just
  left their window (one-token decoding is exact).

* With ``decoding.target_size`` (``harness.decoding``) the gated layers are also cut back to that many entries
  per head every ``decoding.compression_interval`` steps, ranked by their gates (``decode_score``; the window
  stays): the threshold decides what is dropped as it leaves the window, the target caps what is left.

Window default: 64 for the reference model (short contexts); the public implementation uses 256.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.attention import attention_masks, attention_modules, stash_hidden
from harness.cache import RaggedKV, RaggedLayer
from harness.compress import Allocator, LayerInputs, Scorer, register_allocator, register_scorer
from harness.errors import KvbenchError
from harness.learning import Learner, register_learner
from harness.models import model_identity
from harness.paths import check_tensors
from harness.schema import Count, Fraction
from methods._learned import (CONFIG_FILE, check_model, check_shape, expand_heads, load_checkpoint, load_params,
                              params_file, resolve_checkpoint)

log = logging.getLogger("kvbench")
MODEL_PREFIX = "model::"  # checkpoint tensors that replace model parameters (spkv.train_params)
SPKV_HPARAMS = {"feature": str, "window": int}  # what the scorer reads from config.json
FEATURES = ("hidden", "key")


class SPKVParams(nn.Module):
    """Gate predictor of every (layer, KV head): ``w`` ``[L, H, F]``, ``b`` ``[L, H]``."""

    def __init__(self, n_layers: int, n_kv_heads: int, n_feat: int, feature: str = "hidden", init_bias: float = 6.0):
        super().__init__()
        if feature not in FEATURES:
            raise KvbenchError(f"spkv.feature={feature!r} is not supported; allowed: {', '.join(FEATURES)}")
        self.feature = feature
        self.w = nn.Parameter(torch.zeros(n_layers, n_kv_heads, n_feat))
        self.b = nn.Parameter(torch.full((n_layers, n_kv_heads), float(init_bias)))

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict[str, Tensor], where: str = "params.safetensors") -> "SPKVParams":
        """The gates of a checkpoint loaded with ``load_checkpoint(..., "spkv", SPKV_HPARAMS)``; ``where`` names
        its params file in errors."""
        hp, m = config["hparams"], config["model"]
        if hp["feature"] not in FEATURES:
            raise KvbenchError(f"{Path(where).with_name(CONFIG_FILE)}: hparams feature={hp['feature']!r} is not one "
                               f"of {', '.join(FEATURES)}; train one with kvbench-train method=spkv")
        n_feat = m["hidden_size"] if hp["feature"] == "hidden" else m["head_dim"]
        p = cls(m["n_layers"], m["n_kv_heads"], n_feat, hp["feature"])
        load_params(p, {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)}, where, "spkv")
        return p

    def logits(self, layer: int, hidden: Tensor | None, keys: Tensor | None) -> Tensor:
        """Gate logits ``[B, H, T]``."""
        if self.feature == "hidden":
            if hidden is None:
                raise RuntimeError("SP-KV with feature=hidden needs the layer's hidden states")
            g = torch.einsum("btf,hf->bht", hidden.float(), self.w[layer])
        else:
            g = torch.einsum("bhtd,hd->bht", keys.float(), self.w[layer])
        return g + self.b[layer][None, :, None]


def visible(q_pos: Tensor, k_pos: Tensor, gate_open: Tensor, window: int) -> Tensor:
    """SP-KV's visibility rule, ``[..., q, T]`` bool: the query at ``q_pos[i]`` sees the key at ``k_pos[j]`` iff
    ``k_pos[j] <= q_pos[i]`` and (``q_pos[i] - k_pos[j] < window`` or the gate of j is open).
    ``q_pos`` is ``[q]``, ``k_pos`` ``[T]``, ``gate_open`` ``[..., T]``."""
    rel = q_pos[:, None] - k_pos[None, :]
    return (rel >= 0) & ((rel < window) | gate_open[..., None, :])


def gated_visible(gate_open: Tensor, window: int, q_len: int | None = None) -> Tensor:
    """``[H, q, T]``: ``visible`` for a prefill of ``T`` consecutive positions, queries the last ``q`` of them.
    ``gate_open`` is ``[H, T]``."""
    n = gate_open.shape[-1]
    q_len = n if q_len is None else q_len
    pos = torch.arange(n, device=gate_open.device)
    return visible(pos[n - q_len:], pos, gate_open, window)


@contextmanager
def swapped_weights(model: nn.Module, tensors: dict[str, Tensor]):
    """Model parameters replaced by a checkpoint's fine-tuned ones for the duration (restored after)."""
    if not tensors:
        yield
        return
    named = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, t in tensors.items():
            saved[name] = named[name].detach().clone()
            named[name].copy_(t.to(named[name].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in saved.items():
                named[name].copy_(t)


@dataclass
class GatedKV(RaggedKV):
    """Per-head keys of a gated layer for a multi-token step, with each head's visibility (``[q_len, T_h]``,
    True = attend): an entry of this step that left a query's window with a closed gate is not seen."""

    masks: list[Tensor] = field(default_factory=list)

    def head_mask(self, head: int, q_len: int) -> Tensor | None:
        return self.masks[head][None, None]


class GatedLayer(RaggedLayer):
    """A cache layer that evicts entries leaving the local window with a closed gate while decoding."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], positions: list[Tensor], gates: list[Tensor],
                 next_pos: int, window: int, threshold: float, gate_fn):
        super().__init__(keys, values)
        self.positions, self.gates = list(positions), list(gates)
        self.next_pos, self.window, self.threshold, self.gate_fn = next_pos, window, threshold, gate_fn

    def keep(self, kept: list[Tensor]) -> None:
        super().keep(kept)
        self.positions = [p[i.to(p.device)] for p, i in zip(self.positions, kept)]
        self.gates = [g[i.to(g.device)] for g, i in zip(self.gates, kept)]

    def decode_scores(self, head: int) -> Tensor:
        """Head ``head``'s gates, the entries inside the next query's window at +inf (never cut)."""
        scores = self.gates[head].float().clone()
        scores[self.positions[head] > self.next_pos - self.window] = float("inf")
        return scores

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[RaggedKV, RaggedKV]:
        n_new = key_states.shape[-2]
        first = self.next_pos
        u_new = self.gate_fn(key_states)  # [H, n_new]
        new_pos = torch.arange(first, first + n_new, device=key_states.device)
        for h in range(len(self.head_keys)):
            # what the first new query cannot see, no later query sees either: drop it
            keep = visible(new_pos[:1], self.positions[h], self.gates[h] > self.threshold, self.window)[0]
            if not bool(keep.all()):
                self.head_keys[h] = self.head_keys[h][:, :, keep]
                self.head_values[h] = self.head_values[h][:, :, keep]
                self.positions[h], self.gates[h] = self.positions[h][keep], self.gates[h][keep]
            self.positions[h] = torch.cat([self.positions[h], new_pos])
            self.gates[h] = torch.cat([self.gates[h], u_new[h]])
        self.next_pos += n_new
        keys, values = super().update(key_states, value_states)
        if n_new > 1:
            # A multi-token step (the question after the context): query i also must not see an entry of this
            # step that left its window with a closed gate, exactly as the prefill's gated mask.
            masks = [visible(new_pos, p, g > self.threshold, self.window) for p, g in zip(self.positions, self.gates)]
            keys = GatedKV(keys.heads, masks)
        return keys, values


@register_scorer("spkv")
class SPKVScorer(Scorer):
    """Gates ``u`` of a checkpoint, the local window protected (+inf)."""

    scores_decoding_itself = True  # its gated layers hold every decoded entry's gate (decode_score)
    batches_decoding = False  # its decode_patch turns the cache into gated layers of its own

    def __init__(self, checkpoint: str | None = None, window: Count | None = None, threshold: Fraction = 0.1):
        self.checkpoint = checkpoint
        self.config, tensors = load_checkpoint(checkpoint, "spkv", SPKV_HPARAMS)
        self.params = SPKVParams.from_checkpoint(self.config, tensors, str(params_file(checkpoint, "spkv"))).eval()
        self.model_tensors = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        self.window = int(window if window is not None else self.config["hparams"]["window"])
        self.threshold = float(threshold)
        if self.window < 1 or not 0.0 <= self.threshold < 1.0:
            raise KvbenchError(f"method.scorer.window={self.window} / method.scorer.threshold={self.threshold}: need window >= 1, "
                               "0 <= threshold < 1")
        self.needs_hidden_states = self.params.feature == "hidden"
        self._gates: dict[int, Tensor] = {}
        self._kept: dict[int, tuple[int, int]] = {}
        self._n_tokens = 0
        self._checked: set[int] = set()
        self._decoding: dict[int, "GatedLayer"] = {}

    @property
    def where(self) -> str:
        return f"method.scorer.checkpoint={self.checkpoint!r}"

    def input_files(self) -> dict:
        """The files this part read (the runner fingerprints them so a run dir cannot mix two checkpoints)."""
        return {"method.scorer.checkpoint": resolve_checkpoint(self.checkpoint, "spkv")}

    def bind_model(self, model: nn.Module) -> None:
        """Refuse a checkpoint made for another model (the runner calls this right after loading the model)."""
        self._check(model)

    def _check(self, model: nn.Module) -> None:
        if id(model) not in self._checked:
            check_model(self.config, model, self.where)
            # fine-tuned model parameters (spkv.train_params) must be parameters of this model, in their shape
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            check_tensors(self.model_tensors, shapes, f"{params_file(self.checkpoint, 'spkv')} ({MODEL_PREFIX} tensors)",
                          "they were trained for another model; train one for this model with kvbench-train",
                          optional=tuple(shapes))
            self._checked.add(id(model))
        self.params.to(model.device)

    def gates(self, layer: int, hidden: Tensor | None, keys: Tensor | None) -> Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.params.logits(layer, hidden, keys))

    def prefill_patch(self, model: nn.Module, keep_ratio: float):
        return self._prefill(model)

    @contextmanager
    def _prefill(self, model: nn.Module):
        self._check(model)
        modules = attention_modules(model)
        self._gates, self._kept, self._n_tokens = {}, {}, 0
        store: dict[int, Tensor] = {}
        handles = stash_hidden(modules, store) if self.needs_hidden_states else []

        def mask_fn(module, query, key):
            q_len, kv_len = query.shape[2], key.shape[2]
            if q_len != kv_len or q_len <= self.window:
                return None  # not a plain prefill, or everything inside the window: causal
            u = self.gates(module.layer_idx, store.get(module.layer_idx), key)[0]
            return expand_heads(gated_visible(u > self.threshold, self.window), query.shape[1])[None]

        try:
            with swapped_weights(model, self.model_tensors), attention_masks(modules, mask_fn):
                yield
        finally:
            for h in handles:
                h.remove()

    def score(self, inputs: LayerInputs) -> Tensor:
        check_shape(self.config, inputs.n_layers, inputs.keys.shape[1], self.where)
        u = self.gates(inputs.layer_idx, inputs.hidden_states, inputs.keys)
        n = u.shape[-1]
        self._gates[inputs.layer_idx] = u[0]
        self._n_tokens = n
        scores = u.clone()
        scores[..., max(0, n - self.window):] = float("inf")
        self._kept[inputs.layer_idx] = (int((scores[0] > self.threshold).sum()), scores[0].numel())
        return scores

    def row_extras(self) -> dict:
        if not self._kept:
            return {}
        by_layer = [self._kept[i][0] / self._kept[i][1] for i in sorted(self._kept)]
        kept = sum(k for k, _ in self._kept.values())
        total = sum(t for _, t in self._kept.values())
        return {"spkv_keep_ratio": kept / total, "spkv_keep_ratio_by_layer": by_layer}

    def decode_patch(self, model: nn.Module, cache):
        return self._decode(model, cache)

    def decode_score(self, inputs: LayerInputs) -> Tensor:
        """Decode-time compression (``decoding.target_size``) ranks a gated layer's entries by their gates, the
        window protected: the threshold still drops closed gates as they leave the window, and the cut keeps the
        most open of the rest (``GatedLayer.decode_scores``)."""
        layer = self._decoding.get(inputs.layer_idx)
        if layer is None:
            raise ValueError(f"spkv: layer {inputs.layer_idx} is not gated (not selected by the spkv allocator); "
                             "decoding cannot rank its entries")
        heads = range(len(layer.gates)) if inputs.kv_head is None else [inputs.kv_head]
        return torch.stack([layer.decode_scores(h) for h in heads])[None]

    @contextmanager
    def _decode(self, model: nn.Module, cache):
        modules = attention_modules(model)
        store: dict[int, Tensor] = {}
        handles = stash_hidden(modules, store) if self.needs_hidden_states else []
        n = self._n_tokens
        self._decoding = {}  # the gated layers of this generation (decode_score ranks their entries)
        for layer_idx, layer in enumerate(cache.layers):
            u = self._gates.get(layer_idx)
            if u is None:
                continue
            keep = u > self.threshold
            keep[:, max(0, n - self.window):] = True
            if isinstance(layer, RaggedLayer):
                keys, values = layer.head_keys, layer.head_values
            else:
                keys = [layer.keys[:, h : h + 1] for h in range(layer.keys.shape[1])]
                values = [layer.values[:, h : h + 1] for h in range(layer.values.shape[1])]
            if [k.shape[-2] for k in keys] != keep.sum(dim=1).tolist():
                log.warning("spkv: layer %d was not selected by the spkv allocator; no gating while decoding", layer_idx)
                continue
            positions = [keep[h].nonzero().flatten() for h in range(keep.shape[0])]
            gates = [u[h][p] for h, p in enumerate(positions)]

            def gate_fn(key_states, layer_idx=layer_idx):
                return self.gates(layer_idx, store.get(layer_idx), key_states)[0]

            cache.layers[layer_idx] = GatedLayer(keys, values, positions, gates, n, self.window, self.threshold, gate_fn)
            self._decoding[layer_idx] = cache.layers[layer_idx]
        try:
            with swapped_weights(model, self.model_tensors):
                yield
        finally:
            for h in handles:
                h.remove()


@register_allocator("spkv")
class SPKVAllocator(Allocator):
    """Per head, the number of entries scored above the threshold (the window scores +inf): keep_ratio is
    ignored, the budget is the input's own."""

    per_head_budgets = True
    per_layer_budgets = True

    def __init__(self, threshold: Fraction = 0.1):
        self.threshold = float(threshold)

    def budgets(self, scores: list[Tensor], keep_ratio: float) -> Tensor:
        return torch.stack([(s > self.threshold).sum(dim=-1).clamp_min(1) for s in scores]).long()


@register_learner("spkv")
class SPKVLearner(Learner):
    """Training of the gate predictor (see the module docstring)."""

    def __init__(self, model: nn.Module, method_cfg: dict, hp: dict, seed: int = 0):
        sig = model_identity(model)
        self.window = int((method_cfg.get("scorer") or {}).get("window") or hp.get("window") or 64)
        self.hp = {"feature": str(hp.get("feature", "hidden")), "init_bias": float(hp.get("init_bias", 6.0)),
                   "sparsity_weight": float(hp.get("sparsity_weight", 0.2)), "window": self.window,
                   "sparsity_target": None if hp.get("sparsity_target") is None else float(hp["sparsity_target"]),
                   "train_params": [str(p) for p in (hp.get("train_params") or [])]}
        target = self.hp["sparsity_target"]
        if target is not None and not 0.0 <= target < 1.0:
            raise KvbenchError(f"spkv.sparsity_target={target} is not a mean gate; allowed: null or 0 <= target < 1")
        n_feat = sig["hidden_size"] if self.hp["feature"] == "hidden" else sig["head_dim"]
        self.params = SPKVParams(sig["n_layers"], sig["n_kv_heads"], n_feat, self.hp["feature"], self.hp["init_bias"])
        self.needs_hidden = False  # the student runs the whole sequence itself
        model.requires_grad_(False)  # frozen, but for the parameters named in train_params
        self.model_params = {n: p for n, p in model.named_parameters()
                             if any(pat in n for pat in self.hp["train_params"])}
        if self.hp["train_params"] and not self.model_params:
            raise KvbenchError(f"spkv.train_params={self.hp['train_params']} match no model parameter")
        for p in self.model_params.values():
            p.requires_grad_(True)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.params.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)})
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith(MODEL_PREFIX):
                    self.model_params[k[len(MODEL_PREFIX):]].copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        out = dict(self.params.state_dict())
        out.update({MODEL_PREFIX + n: p.detach() for n, p in self.model_params.items()})
        return out

    def student_logits(self, model, modules, batch, keep_ratio: float, gen: torch.Generator):
        """Logits of the whole gated sequence at the question + answer positions, and the sparsity loss."""
        ids = batch.ctx_ids + batch.qa_ids
        n = len(ids)
        device = model.device
        store: dict[int, Tensor] = {}
        handles = stash_hidden(modules, store) if self.hp["feature"] == "hidden" else []
        far_gates = []

        def bias_fn(module, query, key):
            layer = module.layer_idx
            logu = F.logsigmoid(self.params.logits(layer, store.get(layer), key))[0]  # [H, T]
            i = torch.arange(n, device=device)[:, None]
            j = torch.arange(n, device=device)[None, :]
            rel = i - j
            bias = torch.where(rel >= self.window, logu[:, None, :], torch.zeros((), device=device))
            bias = bias.masked_fill(rel < 0, float("-inf"))
            if n > self.window:
                far_gates.append(logu[:, : n - self.window].exp())
            return expand_heads(bias, query.shape[1])[None].to(query.dtype)

        try:
            with attention_masks(modules, bias_fn):
                out = model(input_ids=torch.tensor([ids], device=device),
                            position_ids=torch.arange(n, device=device)[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        u = torch.cat([g.flatten() for g in far_gates]).mean() if far_gates else torch.zeros((), device=device)
        target = self.hp["sparsity_target"]
        aux = {"sparsity": self.hp["sparsity_weight"] * (u if target is None else (u - target).clamp_min(0.0))}
        open_share = float(torch.cat([(g > 0.1).float().flatten() for g in far_gates]).mean()) if far_gates else 1.0
        return out.logits[0, batch.n_ctx:], aux, {"u": float(u.detach()), "open": open_share}

    default_lr = 0.05

    def trainable(self) -> list[nn.Parameter]:
        return list(self.params.parameters()) + list(self.model_params.values())

    def checkpoint_hparams(self, method_cfg: dict) -> dict:
        return dict(self.hp)
