"""KVgrad (kvpress KVgradPress, defaults): kvbench method kvgrad. As KVzipPress (tools/conformance/presses/kvzip.py),
KVgradPress reads ``AutoTokenizer.from_pretrained(model.config.name_or_path)``: the runner points it at the
byte-level tokenizer of ``llama_g1`` while the press runs and kvbench reads the same dir; it masks with one cut over
every layer and head (``global_cut``). chunk_size 64 besides the default 512: several chunks, each with its own
backward pass, on the 200 / 220 ids."""


from kvzip import TOKENIZER, _run  # noqa: F401  (KVzip's group: the same tokenizer and runner)


def cases():
    from kvpress.presses.kvgrad_press import KVgradPress

    return [
        {"press": "KVgradPress", "attn": "sdpa", "factory": lambda cr: KVgradPress(compression_ratio=cr),
         "method": "kvgrad", "overrides": {"tokenizer": TOKENIZER}, "topk": False, "run": _run},
        {"press": "KVgradPress(chunk_size=64)", "attn": "sdpa",
         "factory": lambda cr: KVgradPress(compression_ratio=cr, chunk_size=64),
         "method": "kvgrad", "overrides": {"tokenizer": TOKENIZER, "chunk_size": 64}, "topk": False, "run": _run},
    ]
