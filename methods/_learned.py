"""What the learned methods (LKV, methods/lkv.py; SP-KV, methods/spkv.py) share: their checkpoint files, the
check that a checkpoint fits the model it is used with, and the training-time helpers their learners and
kvbench-train (harness/train.py) use.

Checkpoints (``method.scorer.checkpoint=<dir>``, written by kvbench-train): ``params.safetensors`` (the learned
tensors only) + ``config.json``: ``method``, ``model`` (name/path/family and ``harness.models.model_identity``:
architecture and weights fingerprint), ``hparams`` and the training state's step/data. A checkpoint made for
another model is refused with one line (``check_model``).
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from harness.errors import KvbenchError
from harness.models import check_model_identity
from harness.paths import check_tensors, find_input, read_json_object, read_safetensors

PARAMS_FILE, CONFIG_FILE = "params.safetensors", "config.json"
# What config.json must record of the model (checkpoints of every version carry these).
ARCH_KEYS = ("model_type", "n_layers", "n_kv_heads", "head_dim", "hidden_size", "vocab_size")


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------
def retrain_hint(method: str) -> str:
    return f"train one with kvbench-train method={method} model=<model> out=<dir>"


def resolve_checkpoint(path: str | None, method: str) -> Path:
    """A checkpoint dir: absolute, relative to the working dir, or relative to the repository (package)."""
    if not path:
        raise KvbenchError(f"method.scorer.checkpoint is not set; pass method.scorer.checkpoint=<dir from kvbench-train method={method}>")
    found = find_input(path, lambda c: (c / CONFIG_FILE).exists() and (c / PARAMS_FILE).exists())
    if found is not None:
        return found
    raise KvbenchError(f"method.scorer.checkpoint={path!r} has no {CONFIG_FILE} + {PARAMS_FILE}; {retrain_hint(method)}")


_CACHE: dict[tuple, tuple[dict, dict[str, Tensor]]] = {}


def config_section(config: dict, section: str, fields: dict[str, type], file: Path, method: str) -> dict:
    """``config[section]``, an object whose ``fields`` have the given types (an int field holds a positive
    int), or a one-line error naming the checkpoint's config.json ``file``."""
    node = config.get(section)
    if not isinstance(node, dict):
        raise KvbenchError(f"{file}: no {section!r} object; not a kvbench-train {method} checkpoint, {retrain_hint(method)}")

    def ok(value, kind: type) -> bool:
        if kind is int:  # a count: bool is an int to Python, not here
            return type(value) is int and value > 0
        return isinstance(value, kind)

    bad = [f"{k}={node.get(k)!r}" for k, kind in fields.items() if not ok(node.get(k), kind)]
    if bad:
        raise KvbenchError(f"{file}: {section} has a missing or bad {', '.join(bad)}; {retrain_hint(method)}")
    return node


def load_checkpoint(path: str | Path, method: str, hparams: dict[str, type] | None = None
                    ) -> tuple[dict, dict[str, Tensor]]:
    """``(config, tensors)`` of a checkpoint dir (cached by path and modification time). config.json must name
    the method, the model's shape and the ``hparams`` (name -> type) the method reads; that the tensors fit
    them is checked by the method's ``from_checkpoint`` (``load_params``)."""
    d = resolve_checkpoint(str(path), method)
    key = (str(d), (d / PARAMS_FILE).stat().st_mtime_ns, (d / CONFIG_FILE).stat().st_mtime_ns)
    if key not in _CACHE:
        config = read_json_object(d / CONFIG_FILE, retrain_hint(method))
        if config.get("method") != method:
            raise KvbenchError(f"method.scorer.checkpoint={str(path)!r} holds a {config.get('method')!r} checkpoint, not {method!r}")
        arch = {k: str if k == "model_type" else int for k in ARCH_KEYS}
        config_section(config, "model", arch, d / CONFIG_FILE, method)
        _CACHE[key] = (config, read_safetensors(d / PARAMS_FILE, retrain_hint(method))[0])
    config_section(_CACHE[key][0], "hparams", hparams or {}, d / CONFIG_FILE, method)
    return _CACHE[key]


def params_file(path: str | None, method: str) -> Path:
    """The params.safetensors of checkpoint ``path`` (for error messages)."""
    return resolve_checkpoint(path, method) / PARAMS_FILE


def load_params(module: nn.Module, tensors: dict[str, Tensor], where: str | Path, method: str) -> None:
    """``module.load_state_dict(tensors)`` after checking names and shapes: a params.safetensors (``where``)
    that lacks tensors, has others, or holds them in another shape than its config.json says is one line."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(tensors, want, str(where), f"it does not match its {CONFIG_FILE}; {retrain_hint(method)}")
    module.load_state_dict(tensors)


def save_checkpoint(out_dir: str | Path, method: str, params: nn.Module, model_info: dict, hparams: dict,
                    extra: dict | None = None) -> None:
    """Learned tensors (safetensors) + config.json, each written atomically with the user's umask."""
    from safetensors.torch import save_file

    from harness.io import atomic_save, atomic_write_json

    out = Path(out_dir)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in params.state_dict().items()}
    atomic_save(out / PARAMS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(out / CONFIG_FILE, {"method": method, "model": model_info, "hparams": hparams, **(extra or {})})


def check_model(config: dict, model: nn.Module, where: str) -> None:
    """One-line KvbenchError when the checkpoint was made for another model: its architecture or its weights
    (``harness.models.check_model_identity`` on what config.json records of the model)."""
    want = config.get("model", {})
    check_model_identity(want, model, f"{where} was trained for model {want.get('name', '?')}",
                         "train one for this model with kvbench-train")


def check_shape(config: dict, n_layers: int, n_heads: int, where: str) -> None:
    want = config.get("model", {})
    if (want.get("n_layers"), want.get("n_kv_heads")) != (n_layers, n_heads):
        raise KvbenchError(
            f"{where} was trained for model {want.get('name', '?')} with {want.get('n_layers')} layers x "
            f"{want.get('n_kv_heads')} KV heads; this model has {n_layers} x {n_heads}"
        )


# --------------------------------------------------------------------------------------------------------
# Training-time helpers (the learners and kvbench-train)
# --------------------------------------------------------------------------------------------------------
def copy_cache(cache, values: list[Tensor] | None = None):
    """A new DynamicCache sharing the keys (and the values, unless ``values`` replaces them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    new = DynamicCache()
    layers = []
    for i, layer in enumerate(cache.layers):
        d = DynamicLayer()
        d.dtype, d.device = layer.keys.dtype, layer.keys.device
        d.keys = layer.keys
        d.values = layer.values if values is None else values[i]
        d.is_initialized = True
        layers.append(d)
    new.layers = layers
    return new


def expand_heads(x: Tensor, n_q_heads: int) -> Tensor:
    """``[H_kv, ...]`` to ``[H_q, ...]`` (each KV head repeated for its GQA group)."""
    return x.repeat_interleave(n_q_heads // x.shape[0], dim=0)
