"""Model loading: ``model=tiny-random`` (built from a config), ``model=reference`` (shipped), ``model=hf``.

Hub ids never reach the network: ``HF_HUB_OFFLINE=1`` is the default here, and a hub id that is not in the
local Hugging Face cache fails at once with a one-line error saying how to pass a local path.

Placement (docs/models.md): a checkpoint's weights load straight onto ``model.device`` (``from_pretrained``'s
``device_map=<device>``, never through host memory first); ``model.device_map=auto`` lets accelerate (the
optional ``multi-gpu`` extra) spread a model too large for one GPU over every GPU, and inputs go to
``input_device(model)``, the embedding's device.

Attention quirks: kvbench's attention function and cache treat every layer as one global causal attention with
one RoPE. A config whose layers differ from that in a way that changes outputs (sliding-window layers with a
window shorter than the model's positions, soft-capped attention logits, RoPE on part of each head, RoPE per
layer type) is refused before any weight loads (``attention_quirks``), so such a layer is never silently run
as a global one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from harness.errors import KvbenchError
from harness.paths import open_safetensors, read_json_object

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
# Families kvpress runs (its README, NVIDIA/kvpress@8bb29b9) that we refuse, with the reason read from the config.
REFUSED_FAMILIES = {"gemma3": "Gemma 3", "gemma3_text": "Gemma 3", "gemma2": "Gemma 2"}
# kvpress (base_press.py, NVIDIA/kvpress@8bb29b9) leaves Gemma 3's sliding-window layers uncompressed
KVPRESS_NOTE = dict.fromkeys(("gemma3", "gemma3_text"), " (kvpress compresses only its global layers)")
MULTI_GPU_EXTRA = "pip install 'kvbench[multi-gpu]' (or pip install 'accelerate>=1.0,<2')"
REFERENCE_DIR = Path(__file__).resolve().parent / "reference" / "checkpoint"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A model dir needs one of these to have a tokenizer (tokenizer_config.json alone only configures one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
RECOPY = "the checkpoint directory is incomplete or corrupt: copy or download it again"


def tiny_config(family: str, vocab_size: int, **overrides: Any):
    """A 2-layer, GQA model of the given family with random weights (for tests and smoke runs)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=65536,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(use_sliding_window=False, **common)
    if family == "phi3":  # fused qkv_proj and gate_up_proj; no sliding window
        return Phi3Config(sliding_window=None, **common)
    raise KvbenchError(f"model.family={family!r} is not supported; allowed: {', '.join(FAMILIES)}")


def build_tiny(family: str = "llama", seed: int = 0, **overrides: Any):
    from transformers import AutoModelForCausalLM

    from harness.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    config = tiny_config(family, vocab_size=len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval(), tok


def _resolve_path(path: str | None, name: str) -> str:
    if path is None:
        if name == "reference":
            if not (REFERENCE_DIR / "config.json").exists():
                raise KvbenchError(
                    f"the reference checkpoint is missing at {REFERENCE_DIR}; train it with kvbench-train-reference "
                    "or pass model=tiny-random"
                )
            return str(REFERENCE_DIR)
        raise KvbenchError("model=hf needs model.path=<local checkpoint dir or hub id>")
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise KvbenchError(f"model.path={path!r} has no config.json; pass a Hugging Face checkpoint directory")
        return str(local)
    if "/" not in path or path.startswith((".", "/", "~")):
        raise KvbenchError(f"model.path={path!r} does not exist; pass an existing checkpoint directory")
    # A hub id: allowed only if already in the local cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        raise KvbenchError(
            f"model.path={path!r} is a hub id that is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE=1); download it where a network exists and pass model.path=<the checkpoint dir>"
        ) from None


def device_for(spec: str | None) -> torch.device:
    """The torch device of ``model.device``: auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps; one
    that this machine lacks is refused with the ones it has (torch would fail later, mid-run)."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    allowed = "auto, cpu" + (f", cuda, cuda:0..cuda:{n_gpus - 1}" if n_gpus else "") + (", mps" if mps else "")
    if spec in (None, "auto"):
        return torch.device("cuda" if n_gpus else "cpu")
    text = str(spec)
    if text == "cpu" or (text == "mps" and mps):
        return torch.device(text)
    if text == "mps":
        raise KvbenchError(f"model.device='mps' but MPS is not available on this machine; allowed: {allowed}")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise KvbenchError(f"model.device={spec!r} is not a device; allowed: {allowed}")
    if not n_gpus:
        raise KvbenchError(f"model.device={text!r} but CUDA is not available on this machine; allowed: {allowed}")
    if m.group(1) is not None and int(m.group(1)) >= n_gpus:
        raise KvbenchError(f"model.device={text!r}: this machine has {n_gpus} CUDA device(s); allowed: {allowed}")
    return torch.device(text)


def inspect_model(model_cfg) -> dict[str, Any]:
    """Facts of the model a ``model`` config node names, read from its config.json alone (no weights, no
    tokenizer), so that a run can refuse an unsupported architecture or a too long ``context_length`` before
    loading anything: ``{"model_type", "max_position_embeddings" (int or None), "path" (None for
    tiny-random, built from ``tiny_config``)}``."""
    name = model_cfg.get("name")
    if name == "tiny-random":
        from harness.tokenizer import byte_tokenizer

        config = tiny_config(model_cfg.get("family", "llama"), vocab_size=len(byte_tokenizer()))
        return {"model_type": config.model_type, "max_position_embeddings": config.max_position_embeddings,
                "path": None}
    path = _resolve_path(model_cfg.get("path"), name)
    config_file = Path(path) / "config.json"
    raw = read_json_object(config_file, RECOPY)
    model_type = raw.get("model_type")
    if model_type is None:
        raise KvbenchError(f"{config_file}: no 'model_type'; a Hugging Face config.json names its architecture "
                           f"(supported: {', '.join(FAMILIES)})")
    if model_type in REFUSED_FAMILIES:
        text_config = _load_config(path).get_text_config()
        quirks = attention_quirks(text_config)
        window = sliding_window(text_config)
        if window is not None:
            quirks.insert(0, f"sliding-window layers (window {window}) alternate with global ones")
        raise KvbenchError(f"model.path={path!r} is a {REFUSED_FAMILIES[model_type]} model ({model_type}), which "
                           f"kvbench does not support: {'; '.join(quirks) or 'its attention differs from one global layer'}"
                           f"{KVPRESS_NOTE.get(model_type, '')}; supported families: {', '.join(FAMILIES)}")
    if model_type not in FAMILIES:
        raise KvbenchError(f"model.path={path!r} is a {model_type!r} model; supported families: {', '.join(FAMILIES)}")
    limit = raw.get("max_position_embeddings")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise KvbenchError(f"{config_file}: max_position_embeddings={limit!r} is not a positive integer; {RECOPY}")
    config = _load_config(path)
    quirks = attention_quirks(config)
    if quirks:
        raise KvbenchError(f"model.path={path!r}: this {model_type} config is not supported: {'; '.join(quirks)} "
                           "(docs/models.md lists what runs)")
    window = sliding_window(config)  # "sliding_window" only when some layer has one that can hide keys
    return {"model_type": model_type, "max_position_embeddings": limit, "path": path,
            **({"sliding_window": window} if window is not None else {})}


def sliding_window(config) -> int | None:
    """The window of the config's sliding-window layers (``layer_types`` of Qwen2/Qwen3/Gemma; ``sliding_window``
    on every layer of Mistral/Phi-3), or None when every layer is global. A window at least
    ``max_position_embeddings`` long never hides a key (transformers' window keeps ``q - k < window``): None.
    kvbench's attention and cache run every layer as a global one, which is right while a run's prompt and
    generation fit in the window (``harness.runner`` refuses longer ones)."""
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    limit = getattr(config, "max_position_embeddings", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        windowed = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    else:  # Mistral, Phi-3: the window, when set, is every layer's
        windowed = list(range(n_layers)) if window is not None else []
    if not windowed or (window is not None and limit is not None and window >= limit):
        return None
    return int(window) if window is not None else 1


def attention_quirks(config) -> list[str]:
    """What in a (text) config makes some layer's attention differ from the one global causal attention with
    one RoPE that kvbench's attention function, cache and scorers implement, at any length; empty when there is
    nothing (a sliding window is a limit on the run's length instead: ``sliding_window``).

    * soft-capped attention logits (``attn_logit_softcapping``, Gemma 2): our attention paths would drop it;
    * RoPE on part of each head (``partial_rotary_factor`` < 1, Phi-4-mini) or per layer type (Gemma 3's local
      and global bases): key re-rotation and the scorers that rotate queries apply one full-width RoPE."""
    quirks = []
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        quirks.append(f"attention logits are soft-capped (attn_logit_softcapping={softcap}), which kvbench's "
                      "attention does not apply")
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        bases = ", ".join(f"{kind} {v.get('rope_theta')}" for kind, v in sorted(rope.items()) if isinstance(v, dict))
        quirks.append(f"RoPE differs per layer type ({bases}), while key re-rotation and the scorers that rotate "
                      "queries apply one")
    partial = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    partial = partial if partial is not None else getattr(config, "partial_rotary_factor", None)
    if partial is not None and float(partial) < 1.0:
        quirks.append(f"RoPE rotates only part of each head (partial_rotary_factor={partial}), while key "
                      "re-rotation and the scorers that rotate queries rotate all of it")
    return quirks


def is_attention_module(module) -> bool:
    """A decoder layer's self-attention module of a supported family: it has a ``layer_idx``, an output
    projection ``o_proj`` (scorers read its weights) and its key projection, ``k_proj`` or Phi-3's fused
    ``qkv_proj``."""
    return (hasattr(module, "layer_idx") and hasattr(module, "o_proj")
            and (hasattr(module, "k_proj") or hasattr(module, "qkv_proj")))


def input_device(model) -> torch.device:
    """Where a model's inputs go: its input embedding's device (with ``device_map=auto`` the model's layers sit
    on several devices; accelerate moves each layer's inputs to it, not the ids to the first one)."""
    return model.get_input_embeddings().weight.device


def _load_config(path: str):
    """The transformers config of a checked config.json (a field transformers rejects is named), after checking
    generation_config.json."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    if (Path(path) / "generation_config.json").is_file():
        # transformers drops a corrupt one silently, and its eos ids (e.g. an instruct model's end of turn) with it
        read_json_object(Path(path) / "generation_config.json", RECOPY)
    try:
        return AutoConfig.from_pretrained(path)
    except (StrictDataclassError, ValueError, TypeError, KeyError) as err:
        text = " ".join(line.strip() for line in str(err).splitlines())  # pydantic-style errors span lines
        raise KvbenchError(f"{Path(path) / 'config.json'}: rejected by transformers ({type(err).__name__}: "
                           f"{text[:300]}); {RECOPY}") from None


def load_tokenizer(path: str):
    """The tokenizer of a model dir; missing or corrupt tokenizer files are named before transformers sees them."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    root = Path(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise KvbenchError(f"model.path={path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                           "model's tokenizer files into it")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (root / name).is_file():
            read_json_object(root / name, RECOPY)
    if (root / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise KvbenchError(f"{root / 'tokenizer.json'}: not a tokenizers file ({err}); {RECOPY}") from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise KvbenchError(f"model.path={path!r}: its tokenizer files do not load ({type(err).__name__}: "
                           f"{first[:200]}); {RECOPY}") from None


def _load_weights(path: str, config, dtype: torch.dtype, device_map: str = "cpu"):
    """The model's weights; every safetensors file's header is checked first (a truncated copy is named),
    and weights that leave parameters of config.json uninitialised are refused (transformers would fill them
    with random values). ``device_map``: a device (each tensor is read from its file onto it, in ``dtype``, with
    no copy of the model in host memory first) or ``auto`` (accelerate places the layers)."""
    from transformers import AutoModelForCausalLM

    root = Path(path)
    if not any((root / f).is_file() for f in WEIGHT_FILES):
        raise KvbenchError(f"model.path={path!r} has no weights (none of {', '.join(WEIGHT_FILES)}); {RECOPY}")
    for shard in sorted(root.glob("*.safetensors")):
        with open_safetensors(shard, RECOPY):
            pass
    # transformers reads each tensor straight onto a device only through accelerate (an optional extra); without
    # it the weights load into host memory and move once (on a CPU there is nothing to move)
    direct = device_map if device_map == "auto" or accelerate_installed() else None
    try:
        # ignore_mismatched_sizes: a tensor of another shape than config.json says is reported in ``info`` (and
        # refused below, with its name) instead of transformers' error pointing at a log line.
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation="sdpa",
                                                           ignore_mismatched_sizes=True, output_loading_info=True,
                                                           device_map=direct)
    except ValueError as err:
        if device_map == "auto" and "offload" in str(err):  # accelerate mapped some layers to disk
            raise KvbenchError(f"model.device_map=auto: model.path={path!r} does not fit in this machine's GPU and "
                               "CPU memory (accelerate would offload layers to disk, which kvbench does not do); "
                               "use a machine with more memory or model.dtype=bfloat16") from None
        raise
    except (OSError, RuntimeError) as err:  # a missing shard of an index, an unreadable or corrupt .bin
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KvbenchError(f"model.path={path!r}: the weights do not load ({first[:200]}); {RECOPY}") from None
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, found, wanted = mismatched[0]
        raise KvbenchError(f"model.path={path!r}: {len(mismatched)} weight tensor(s) do not fit its config.json "
                           f"(e.g. {name} is {tuple(found)}, config.json needs {tuple(wanted)}); {RECOPY}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise KvbenchError(f"model.path={path!r}: the weights lack {len(missing)} tensor(s) its config.json needs "
                           f"(e.g. {missing[0]}); {RECOPY}")
    return model if direct is not None or device_map == "cpu" else model.to(device_map)


def accelerate_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def placement(cfg) -> str:
    """Where a ``model`` config node puts the weights: ``"auto"`` (accelerate spreads the layers over every GPU,
    ``model.device_map=auto``) or one device, ``model.device_map`` when set, else ``model.device``. A device
    this machine lacks, ``device_map=auto`` without accelerate, and two different devices are refused."""
    device_map, device = cfg.get("device_map"), cfg.get("device", "auto")
    if device_map is None:
        return str(device_for(device))
    if device_map == "auto":
        if device not in (None, "auto"):
            raise KvbenchError(f"model.device_map=auto places the layers itself; model.device={device!r} would put "
                               "them on one device: pass one of the two (model.device=auto with device_map=auto)")
        if not accelerate_installed():
            raise KvbenchError(f"model.device_map=auto needs accelerate, which is not installed: {MULTI_GPU_EXTRA}")
        return "auto"
    target = device_for(device_map)
    if device not in (None, "auto") and device_for(device) != target:
        raise KvbenchError(f"model.device_map={device_map!r} and model.device={device!r} name two devices; "
                           "pass one of them")
    return str(target)


def _dispatch_auto(model):
    """A model built in memory (tiny-random) placed as ``from_pretrained(device_map="auto")`` places one:
    accelerate's balanced map over the GPUs (everything on the CPU without one), never splitting a decoder
    layer."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = model._no_split_modules
    memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    if len(set(device_map.values())) == 1:
        return model.to(next(iter(device_map.values())))
    model.hf_device_map = device_map
    return dispatch_model(model, device_map=device_map)


def load_model(cfg) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``model`` config node (name, family, path, dtype, device, device_map)."""
    name = cfg.get("name")
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise KvbenchError(f"model.dtype={dtype_name!r} is not supported; allowed: {', '.join(DTYPES)}")
    target = placement(cfg)
    if name == "tiny-random":
        # built on the CPU whatever the device, so that its seeded random weights are the same everywhere
        model, tok = build_tiny(cfg.get("family", "llama"), seed=int(cfg.get("seed", 0)))
        model = model.to(dtype=DTYPES[dtype_name])
        return (_dispatch_auto(model) if target == "auto" else model.to(target)), tok
    path = inspect_model(cfg)["path"]  # refuses a bad config.json or another architecture before any loading
    config = _load_config(path)
    tok = load_tokenizer(path)
    model = _load_weights(path, config, DTYPES[dtype_name], target)
    return model.eval(), tok


# ------------------------------------------------------------------------------------------------------------
# Model identity: what a file made for one model (a learned checkpoint, a budget profile) records of it
# ------------------------------------------------------------------------------------------------------------
# Architecture facts; ``config_hash`` is a short hash of exactly these (profiles of earlier versions carry it).
IDENTITY_KEYS = ("model_type", "n_layers", "n_kv_heads", "n_heads", "head_dim", "hidden_size", "vocab_size")


def model_identity(model) -> dict[str, Any]:
    """The facts a file made for ``model`` records and must match when it is used: the architecture
    (``IDENTITY_KEYS``), ``config_hash`` (a hash of those) and ``fingerprint``, the absolute sum of the first 64
    rows of the input embeddings (the same architecture with other weights differs here)."""
    text = getattr(model.config, "text_config", model.config)
    n_heads = int(getattr(text, "num_attention_heads", 0))
    facts: dict[str, Any] = {
        "model_type": getattr(text, "model_type", "?"),
        "n_layers": int(getattr(text, "num_hidden_layers", 0)),
        "n_kv_heads": int(getattr(text, "num_key_value_heads", None) or n_heads),
        "n_heads": n_heads,
        "hidden_size": int(getattr(text, "hidden_size", 0)),
        "head_dim": int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // max(1, n_heads)),
        "vocab_size": int(getattr(text, "vocab_size", 0)),
    }
    facts["config_hash"] = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    emb = model.get_input_embeddings().weight
    facts["fingerprint"] = float(emb[: min(64, emb.shape[0])].detach().float().abs().sum())
    return facts


def model_name(model, fallback: str = "") -> str:
    """The last part of the path or hub id the model was loaded from (``fallback`` for a model built in memory)."""
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "") or "")
    return name.rstrip("/").split("/")[-1] if name else fallback


def check_model_identity(recorded: dict, model, claim: str, remedy: str, name: str | None = None) -> None:
    """Refuse a file made for another model: a one-line ``KvbenchError`` ``"<claim>[ with L layers x H KV heads;
    this model has l x h] (another model: <fact> <recorded> vs <this model's>, ... in this model); <remedy>"``
    when a fact ``recorded`` carries differs from ``model_identity(model)`` (the fingerprint by more than 1%:
    dtype and device round it), or when ``name`` (the ``model_name`` the file recorded) is not this model's.
    Facts a file does not carry (files of earlier versions) are not compared."""
    have = model_identity(model)
    diff = [f"{k} {recorded[k]} vs {have[k]}" for k in IDENTITY_KEYS if k in recorded and recorded[k] != have[k]]
    if not diff and recorded.get("config_hash") and str(recorded["config_hash"]) != have["config_hash"]:
        diff.append(f"config_hash {recorded['config_hash']} vs {have['config_hash']}")
    fp = recorded.get("fingerprint")
    if type(fp) in (int, float) and not math.isclose(fp, have["fingerprint"], rel_tol=1e-2):
        diff.append(f"weights fingerprint {fp:.6g} vs {have['fingerprint']:.6g}")
    mine = model_name(model)
    if name and mine and name != mine:
        diff.append(f"name {name!r} vs {mine!r}")
    if diff:
        shape, dims = "", ("n_layers", "n_kv_heads")
        if set(dims) <= set(recorded) and any(recorded[k] != have[k] for k in dims):
            shape = (f" with {recorded['n_layers']} layers x {recorded['n_kv_heads']} KV heads; this model has "
                     f"{have['n_layers']} x {have['n_kv_heads']}")
        raise KvbenchError(f"{claim}{shape} (another model: {', '.join(diff)} in this model); {remedy}")
