"""Cache surgery on transformers 5.x ``DynamicCache`` (``layers[i].keys/values`` are ``[B, H_kv, T, D]``).

``prune`` builds a new cache holding only the kept entries; the full cache is left untouched, so one prefill
can be pruned at several keep ratios. When the heads of a layer keep different numbers of entries, the layer
becomes a ``RaggedLayer``: one tensor per head holding exactly what that head keeps (no padding, no masked
keys), so ``cache_bytes`` is the memory really held. ``harness.attention`` computes attention over it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from transformers import DynamicCache
from torch.nn.utils.rnn import pad_sequence
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


def bottom_right_causal(q_len: int, kv_len: int, device) -> Tensor:
    """``[1, 1, q_len, kv_len]`` bool mask: query i sees keys ``j <= kv_len - q_len + i``."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]


def left_padded(heads: list[Tensor]) -> Tensor:
    """Per-head ``[B, 1, T_h, D]`` tensors as one ``[B, H, max T_h, D]``, each head's entries at the right end
    (zeros before them): every head's newest entry is then in the last column, so a multi-token step stays
    bottom-right causal across heads. One C++ call (``pad_sequence``), not a copy per head."""
    batch = heads[0].shape[0]
    if batch == 1:
        return pad_sequence([h[0, 0] for h in heads], batch_first=True, padding_side="left")[None]
    stacked = pad_sequence([h[:, 0].transpose(0, 1) for h in heads], batch_first=True, padding_side="left")
    return stacked.permute(2, 0, 1, 3)  # [H, T, B, D] -> [B, H, T, D]


def padding_mask(pad: Tensor, width: int, q_len: int) -> Tensor:
    """``[B, H, q_len, width]`` bool (True = attend) for left-padded heads: row ``(b, h)``'s first ``pad[b, h]``
    columns are padding; the ``q_len`` new queries see the rest bottom-right causally."""
    columns = torch.arange(width, device=pad.device)
    mask = (columns[None, None, :] >= pad[:, :, None])[:, :, None, :]
    if q_len > 1:
        mask = mask & bottom_right_causal(q_len, width, pad.device)
    return mask


@dataclass
class PaddedKV:
    """A layer's keys (or values) with rows of different lengths held in one left-padded ``[B, H, T, D]`` tensor:
    ``pad[b, h]`` leading columns of sample ``b``'s KV head ``h`` are padding (batched decoding,
    ``BatchLayer``). The attention function masks them out."""

    states: Tensor
    pad: Tensor  # [B, H] long

    def mask(self, q_len: int) -> Tensor:
        return padding_mask(self.pad, self.states.shape[-2], q_len)


@dataclass
class RaggedKV:
    """Per-head key (or value) tensors of one layer, each ``[B, 1, T_h, D]``; handed to the attention function."""

    heads: list[Tensor]

    @property
    def lengths(self) -> list[int]:
        return [h.shape[-2] for h in self.heads]

    def padded(self) -> Tensor:
        """The heads as one left-padded ``[B, H, T, D]`` tensor (``left_padded``), for one attention call."""
        return left_padded(self.heads)

    def padded_mask(self, q_len: int) -> Tensor:
        """``[B, H, q_len, T]`` bool mask over ``padded()``: padding hidden, and each head's own ``head_mask``
        (bottom-right causal by default) over its entries."""
        lengths = self.lengths
        width = max(lengths)
        pad = torch.tensor([width - n for n in lengths], device=self.heads[0].device)
        mask = padding_mask(pad[None], width, q_len).expand(self.heads[0].shape[0], -1, -1, -1)
        if q_len == 1:
            return mask
        mask = mask.clone()
        for h, n in enumerate(lengths):  # a multi-token step: each head's own visibility over its columns
            own = self.head_mask(h, q_len)
            if own is not None:
                mask[:, h, :, width - n:] = own[:, 0]
        return mask

    def head_mask(self, head: int, q_len: int) -> Tensor | None:
        """The mask of ``q_len`` new queries over head ``head``'s entries (bool, True = attend): None for one
        query, else bottom-right causal. A cache layer with its own visibility rule (SP-KV's gates) hands the
        attention a subclass that overrides this."""
        if q_len == 1:
            return None
        return bottom_right_causal(q_len, self.heads[head].shape[-2], self.heads[head].device)


class RaggedLayer(CacheLayerMixin):
    """A cache layer whose KV heads hold different numbers of entries."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: list[Tensor], values: list[Tensor]):
        super().__init__()
        self.head_keys = list(keys)
        self.head_values = list(values)
        self.dtype, self.device = keys[0].dtype, keys[0].device
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # already initialised
        return None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[RaggedKV, RaggedKV]:
        # Every head receives the same new tokens; each grows its own tensor.
        self.head_keys = [torch.cat([k, key_states[:, h : h + 1]], dim=-2) for h, k in enumerate(self.head_keys)]
        self.head_values = [torch.cat([v, value_states[:, h : h + 1]], dim=-2) for h, v in enumerate(self.head_values)]
        return RaggedKV(self.head_keys), RaggedKV(self.head_values)

    def get_seq_length(self) -> int:
        return max(k.shape[-2] for k in self.head_keys)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def lengths(self) -> list[int]:
        return [k.shape[-2] for k in self.head_keys]

    def keep(self, kept: list[Tensor]) -> None:
        """Cut each head to the entries ``kept[h]`` (sorted indices), in place: a decode-time cut
        (``harness.decoding``). A subclass with per-entry state of its own (SP-KV's gates) cuts it alike."""
        self.head_keys = [k[:, :, i.to(k.device)] for k, i in zip(self.head_keys, kept)]
        self.head_values = [v[:, :, i.to(v.device)] for v, i in zip(self.head_values, kept)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.head_keys + self.head_values)


class BatchLayer(CacheLayerMixin):
    """One layer of several samples' pruned caches decoded together (``harness.pipeline.DecodeBatch``): keys and
    values ``[N, H, T, D]`` left-padded per (sample, KV head), ``pad [N, H]`` the padding columns of each. Every
    row's newest entry sits in the last column, so appending a step is one ``torch.cat`` for the whole batch and
    the attention is one masked call (``harness.attention.padded_attention``)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: Tensor, values: Tensor, pad: Tensor):
        super().__init__()
        self.keys, self.values, self.pad = keys, values, pad
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @classmethod
    def stack(cls, layers: list) -> "BatchLayer":
        """One sample's layer per row (a dense ``[1, H, T, D]`` layer or a ``RaggedLayer``), left-padded to the
        longest (sample, head)."""
        keys, values = [], []
        for layer in layers:
            if isinstance(layer, RaggedLayer):
                keys += layer.head_keys
                values += layer.head_values
            else:
                keys += list(layer.keys.split(1, dim=1))
                values += list(layer.values.split(1, dim=1))
        n_rows, n_heads = len(layers), len(keys) // len(layers)
        lengths = torch.tensor([k.shape[-2] for k in keys], device=keys[0].device).view(n_rows, n_heads)
        padded_keys, padded_values = left_padded(keys), left_padded(values)  # [1, N * H, T, D]
        width = padded_keys.shape[-2]
        shape = (n_rows, n_heads, width, padded_keys.shape[-1])
        return cls(padded_keys.view(shape), padded_values.view(n_rows, n_heads, width, -1), width - lengths)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # already initialised
        return None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[PaddedKV, Tensor]:
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return PaddedKV(self.keys, self.pad), self.values

    def select(self, rows: Tensor) -> None:
        """Keep only the samples ``rows`` (those still generating), and drop the columns that are padding in
        every one of them."""
        self.keys, self.values, self.pad = self.keys[rows], self.values[rows], self.pad[rows]
        drop = int(self.pad.min())
        if drop:
            self.keys, self.values, self.pad = self.keys[:, :, drop:], self.values[:, :, drop:], self.pad - drop

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


@dataclass
class ChannelKV:
    """The keys of a layer whose older entries hold only some key channels, handed to the attention function:
    ``pruned [B, H_kv, T_p, d]`` over ``channels [H_kv, d]`` (sorted indices into head_dim, per KV head), then
    ``full [B, H_kv, T_f, D]`` (the entries that keep every channel: a recent window and everything decoded)."""

    pruned: Tensor
    channels: Tensor
    full: Tensor

    @property
    def length(self) -> int:
        return self.pruned.shape[-2] + self.full.shape[-2]


class ChannelLayer(CacheLayerMixin):
    """A cache layer that stores fewer key channels for its older entries (ThinK): the pruned keys really are
    ``d < D`` wide, so ``nbytes`` is what is held; new entries are appended whole."""

    is_sliding = False
    is_compileable = False

    def __init__(self, pruned: Tensor, channels: Tensor, full_keys: Tensor, values: Tensor):
        super().__init__()
        self.pruned, self.channels, self.full_keys, self.values = pruned, channels, full_keys, values
        self.dtype, self.device = values.dtype, values.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # already initialised
        return None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[ChannelKV, Tensor]:
        self.full_keys = torch.cat([self.full_keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return ChannelKV(self.pruned, self.channels, self.full_keys), self.values

    def get_seq_length(self) -> int:
        return self.pruned.shape[-2] + self.full_keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pruned, self.full_keys, self.values))


def channel_layer(keys: Tensor, values: Tensor, channels: Tensor, n_full: int) -> ChannelLayer:
    """A dense layer's ``keys [B, H, T, D]`` cut to ``channels [H, d]`` but for the last ``n_full`` entries."""
    n_pruned = max(0, keys.shape[-2] - n_full)
    index = channels.to(keys.device)[None, :, None, :].expand(keys.shape[0], -1, n_pruned, -1)
    pruned = keys[:, :, :n_pruned].gather(-1, index)
    return ChannelLayer(pruned, channels.to(keys.device), keys[:, :, n_pruned:], values)


def _dense_layer(keys: Tensor, values: Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.keys, layer.values = keys, values
    layer.is_initialized = True
    return layer


def layer_bytes(layer) -> int:
    if isinstance(layer, (RaggedLayer, ChannelLayer)):
        return layer.nbytes()
    if getattr(layer, "keys", None) is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of every key and value tensor the cache holds."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def kept_per_head(cache: DynamicCache) -> list[list[int]]:
    """Number of entries each (layer, KV head) holds."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            out.append(layer.lengths)
        elif isinstance(layer, ChannelLayer):
            out.append([layer.get_seq_length()] * layer.values.shape[1])
        else:
            out.append([layer.keys.shape[-2]] * layer.keys.shape[1])
    return out


def prune_layer(keys: Tensor, values: Tensor, kept: Tensor) -> DynamicLayer:
    """A dense layer of the entries ``kept`` (``[H, b]`` indices, one count for every head) of ``keys`` /
    ``values`` ``[B, H, T, D]``."""
    gather = kept.to(keys.device)[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[-1])
    return _dense_layer(keys.gather(2, gather), values.gather(2, gather))


# ``merge(layer_idx, keys, values, kept) -> (keys, values)``: a method's rewrite of a pruned layer's entries
# from the evicted ones (``harness.compress.Method.merge``), applied before the kept positions are gathered.
MergeFn = Callable[[int, Tensor, Tensor, "Tensor | list[Tensor]"], "tuple[Tensor, Tensor]"]


def prune(cache: DynamicCache, kept: list[Tensor | list[Tensor] | None], merge: MergeFn | None = None,
          channels: list | None = None) -> DynamicCache:
    """A new cache with, per layer, only the kept entries.

    ``kept[l]`` is ``None`` (keep the layer whole: its tensors are shared, and decoding's ``torch.cat``
    never writes into them), an ``[H, b]`` index tensor (dense layer), or a list of per-head index tensors
    (ragged layer). ``merge`` (a method's ``Method.merge``) rewrites each pruned layer's keys and values before
    the kept positions are gathered; it never sees a layer kept whole. ``channels[l]`` (a method's
    ``Method.key_channels``: ``harness.compress.KeyChannels`` or None) stores only those key channels of the
    layer's kept entries (a ``ChannelLayer``; a ragged layer cannot be channel-pruned). The source cache is not
    modified.
    """
    new = DynamicCache()
    layers = []
    for layer_idx, (layer, idx) in enumerate(zip(cache.layers, kept)):
        keys, values = layer.keys, layer.values
        if idx is not None and merge is not None:
            keys, values = merge(layer_idx, keys, values, idx)
        if idx is None:
            layers.append(_dense_layer(keys, values))
        elif isinstance(idx, Tensor):
            layers.append(prune_layer(keys, values, idx))
        else:
            head_keys = [keys[:, h : h + 1, i.to(keys.device)] for h, i in enumerate(idx)]
            head_values = [values[:, h : h + 1, i.to(values.device)] for h, i in enumerate(idx)]
            layers.append(RaggedLayer(head_keys, head_values))
        cut = channels[layer_idx] if channels is not None else None
        if cut is not None:
            if isinstance(layers[-1], RaggedLayer):
                raise ValueError(f"layer {layer_idx}: key channels cannot be pruned on a ragged layer")
            dense = layers.pop()
            layers.append(channel_layer(dense.keys, dense.values, cut.channels, cut.n_full))
    new.layers = layers
    return new


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(cache: DynamicCache, positions: list[Tensor], inv_freq: Tensor) -> int:
    """Rotate the kept keys of a pruned cache, in place, from their prompt positions to ``0 .. n - 1`` in the
    order they are cached (KeyRerotationPress, StreamingLLM's rolling cache); returns ``n``, where decoding
    continues. ``positions[l]`` is ``[H, n]``: the prompt position of each cached entry of layer ``l``.

    RoPE rotates each channel pair by ``position * inv_freq``, so moving a key from ``p`` to ``j`` is one more
    rotation by ``(j - p) * inv_freq``; a rope's attention factor (YaRN) is already in the key and is not applied
    again. Every layer and head must hold the same ``n`` (one position to decode from)."""
    counts = {int(p.shape[-1]) for p in positions}
    if len(counts) != 1:
        raise ValueError(f"rerotate_keys needs one kept count in every layer; got {sorted(counts)}")
    (n,) = counts
    for layer, pos in zip(cache.layers, positions):
        target = torch.arange(n, dtype=torch.float32)
        layer.keys = rotate_by(layer.keys, target[None, :] - pos.float().cpu(), inv_freq)
    return n


def rotate_by(x: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """``x [B, H, n, D]`` (post-RoPE keys or queries) rotated ``delta`` positions further, ``delta`` ``[n]`` or
    ``[H, n]``: RoPE rotates each channel pair by ``position * inv_freq``, so moving a vector from ``p`` to ``p +
    delta`` is one more rotation by ``delta * inv_freq`` (a rope's attention factor, YaRN's, is already in it)."""
    delta = delta.to(x.device).float()
    delta = delta[None, None, :, None] if delta.dim() == 1 else delta[None, :, :, None]
    angles = delta * inv_freq.to(x.device).float()  # [1, H or 1, n, D / 2]
    angles = torch.cat((angles, angles), dim=-1)
    v = x.float()
    return (v * angles.cos() + _rotate_half(v) * angles.sin()).to(x.dtype)
