"""Corrupt, incomplete or missing input files: each is one ``KvbenchError`` line naming the file and what is wrong
(the CLI prints it as ``kvbench: error: ...`` and exits 2), never a traceback, a silent fallback or a hang.

Every bad file is built here in tmp_path; the shipped reference checkpoint is copied before it is damaged.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import methods
import tasks
from harness.errors import KvbenchError
from harness.models import REFERENCE_DIR, build_tiny, device_for, inspect_model, load_model, model_identity
from harness.profiles import Profile, load_profile, save_profile
from methods._learned import save_checkpoint
from methods.lkv import LKVParams
from methods.spkv import SPKVParams
from tasks.base import PromptEncoder

ROOT = Path(__file__).resolve().parent.parent
needs_reference = pytest.mark.skipif(not (REFERENCE_DIR / "model.safetensors").exists(),
                                     reason="reference checkpoint not trained")


def raises_one_line(fn, *needles):
    """``fn()`` raises a one-line KvbenchError containing every needle; returns the message."""
    with pytest.raises(KvbenchError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def enc():
    from harness.tokenizer import byte_tokenizer

    return PromptEncoder(byte_tokenizer())


# --------------------------------------------------------------------------------------------- model dirs
def _write(name, data):
    def damage(d):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return damage


def _remove(*names):
    def damage(d):
        for n in names:
            (d / n).unlink()
    return damage


def _truncate(name):
    def damage(d):
        b = (d / name).read_bytes()
        (d / name).write_bytes(b[: len(b) // 2])
    return damage


def _config(**changes):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (d / "config.json").write_text(json.dumps(cfg))
    return damage


MODEL_DIR_CASES = {
    "truncated weights": (_truncate("model.safetensors"), ["model.safetensors", "truncated or corrupt"]),
    "garbage weights": (_write("model.safetensors", b"not a tensor file" * 8), ["model.safetensors", "corrupt"]),
    "empty weights": (_write("model.safetensors", b""), ["model.safetensors", "truncated or corrupt"]),
    "no weights": (_remove("model.safetensors"), ["has no weights", "model.safetensors"]),
    "config garbage": (_write("config.json", "{not json"), ["config.json", "malformed JSON", "line 1"]),
    "config truncated": (_truncate("config.json"), ["config.json", "malformed JSON"]),
    "config not an object": (_write("config.json", "[1, 2]"), ["config.json", "JSON object is needed", "list"]),
    "config not UTF-8": (_write("config.json", b'{"model_type": "ll\xffama"}'), ["config.json", "not UTF-8", "0xff"]),
    "config without model_type": (_config(model_type=None), ["config.json", "no 'model_type'", "llama"]),
    "config field rejected": (_config(num_hidden_layers="four"), ["config.json", "num_hidden_layers"]),
    "config max positions": (_config(max_position_embeddings="lots"), ["config.json", "max_position_embeddings"]),
    "weights lack layers": (_config(num_hidden_layers=6), ["lack", "model.layers.4"]),
    "weights of other shape": (_config(hidden_size=64), ["do not fit its config.json", "(2048, 128)"]),
    "no tokenizer files": (_remove("tokenizer.json", "tokenizer_config.json"), ["has no tokenizer", "tokenizer.json"]),
    "tokenizer garbage": (_write("tokenizer.json", "{garbage"), ["tokenizer.json", "not a tokenizers file"]),
    "tokenizer truncated": (_truncate("tokenizer.json"), ["tokenizer.json", "not a tokenizers file"]),
    "tokenizer empty object": (_write("tokenizer.json", "{}"), ["tokenizer.json", "not a tokenizers file"]),
    "tokenizer not UTF-8": (_write("tokenizer.json", b"\xff\xfe{}"), ["tokenizer.json", "UTF-8"]),
    "tokenizer config list": (_write("tokenizer_config.json", "[1]"), ["tokenizer_config.json", "JSON object"]),
    "tokenizer config garbage": (_write("tokenizer_config.json", "{x"), ["tokenizer_config.json", "malformed JSON"]),
    "generation config garbage": (_write("generation_config.json", "{x"), ["generation_config.json", "malformed JSON"]),
}


def _damaged_copy(tmp_path, damage):
    d = tmp_path / "model"
    shutil.copytree(REFERENCE_DIR, d)
    damage(d)
    return d


@needs_reference
@pytest.mark.parametrize("case", list(MODEL_DIR_CASES))
def test_bad_model_dir_is_one_line(tmp_path, case):
    damage, needles = MODEL_DIR_CASES[case]
    d = _damaged_copy(tmp_path, damage)
    raises_one_line(lambda: load_model({"name": "hf", "path": str(d), "dtype": "float32", "device": "cpu"}), *needles)


@needs_reference
def test_architecture_and_facts_come_from_config_before_any_weight(tmp_path):
    d = _damaged_copy(tmp_path, _write("model.safetensors", b"garbage"))
    facts = inspect_model({"name": "hf", "path": str(d)})  # weights are never opened
    assert facts == {"model_type": "llama", "max_position_embeddings": 16384, "path": str(d)}
    _config(model_type="gpt2")(d)
    for fn in (lambda: inspect_model({"name": "hf", "path": str(d)}),
               lambda: load_model({"name": "hf", "path": str(d), "device": "cpu"})):
        raises_one_line(fn, "'gpt2'", "supported families", "llama")  # not the weights' error: refused first
    _config(model_type="llama", max_position_embeddings=None)(d)
    assert inspect_model({"name": "hf", "path": str(d)})["max_position_embeddings"] is None


def test_inspect_model_of_built_and_shipped_models():
    tiny = inspect_model(OmegaConf.create({"name": "tiny-random", "family": "qwen3"}))
    assert tiny == {"model_type": "qwen3", "max_position_embeddings": 65536, "path": None}
    raises_one_line(lambda: inspect_model({"name": "tiny-random", "family": "gpt2"}), "model.family='gpt2'")
    raises_one_line(lambda: inspect_model({"name": "hf", "path": None}), "model.path=")
    if (REFERENCE_DIR / "config.json").exists():
        ref = inspect_model(OmegaConf.create({"name": "reference", "path": None}))
        assert ref["model_type"] == "llama" and isinstance(ref["max_position_embeddings"], int)
        assert ref["path"] == str(REFERENCE_DIR)


@pytest.mark.parametrize("spec, needles", [
    ("cuda", ["model.device='cuda'", "CUDA is not available", "allowed: auto, cpu"]),
    ("cuda:1", ["model.device='cuda:1'", "CUDA is not available", "allowed: auto, cpu"]),
    ("gpu", ["model.device='gpu'", "not a device", "allowed: auto, cpu"]),
    ("cuda:x", ["model.device='cuda:x'", "not a device"]),
    ("mps", ["model.device='mps'", "MPS is not available", "allowed: auto, cpu"]),
])
def test_device_without_cuda(monkeypatch, spec, needles):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    raises_one_line(lambda: device_for(spec), *needles)
    assert device_for("auto") == device_for(None) == device_for("cpu") == torch.device("cpu")


def test_device_with_cuda_names_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_for("cuda:1") == torch.device("cuda:1") and device_for("auto") == torch.device("cuda")
    raises_one_line(lambda: device_for("cuda:2"), "2 CUDA device(s)", "cuda:0..cuda:1")
    raises_one_line(lambda: device_for("tpu"), "allowed: auto, cpu, cuda, cuda:0..cuda:1")


# --------------------------------------------------------------------------------------- learned methods
def _method_cfg(name, **overrides):
    return methods.config(name, **overrides)


def _checkpoint(name, d, model):
    sig = model_identity(model)
    info = {"name": "tiny-random", "path": None, "family": "llama", **sig}
    if name == "lkv":
        params = LKVParams(sig["n_layers"], sig["n_kv_heads"], sig["head_dim"], sig["hidden_size"], 8, False)
        save_checkpoint(d, "lkv", params, info, {"width": 8, "use_hidden": False})
    else:
        params = SPKVParams(sig["n_layers"], sig["n_kv_heads"], sig["hidden_size"], "hidden")
        save_checkpoint(d, "spkv", params, info, {"feature": "hidden", "window": 16})
    return params


def _edit_json(section=None, **changes):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        node = cfg if section is None else cfg[section]
        for k, v in changes.items():
            if v is None:
                node.pop(k)
            else:
                node[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return damage


def _edit_tensors(fn):
    def damage(d):
        from safetensors.torch import load_file

        tensors = load_file(str(d / "params.safetensors"))
        save_file(fn(tensors), str(d / "params.safetensors"))
    return damage


def _other_layers(tensors):
    return {k: torch.cat([v, v[:1]]) for k, v in tensors.items()}  # 3 layers, config.json says 2


CHECKPOINT_CASES = {
    "no params": (_remove("params.safetensors"), ["has no config.json + params.safetensors", "kvbench-train"]),
    "params truncated": (_truncate("params.safetensors"), ["params.safetensors", "truncated or corrupt"]),
    "params garbage": (_write("params.safetensors", b"\x00" * 64), ["params.safetensors", "corrupt"]),
    "config garbage": (_write("config.json", "{"), ["config.json", "malformed JSON", "kvbench-train"]),
    "config not an object": (_write("config.json", '"lkv"'), ["config.json", "JSON object is needed"]),
    "config not UTF-8": (_write("config.json", b"\xc3\x28"), ["config.json", "not UTF-8"]),
    "config without model": (_edit_json(model=None), ["config.json", "no 'model' object"]),
    "config without n_layers": (_edit_json("model", n_layers=None), ["config.json", "n_layers=None"]),
    "config bad n_kv_heads": (_edit_json("model", n_kv_heads="two"), ["config.json", "n_kv_heads='two'"]),
    "config without hparams": (_edit_json(hparams=None), ["config.json", "no 'hparams' object"]),
    "tensor missing": (_edit_tensors(lambda t: dict(list(t.items())[1:])), ["params.safetensors", "lacks"]),
    "tensor extra": (_edit_tensors(lambda t: {**t, "stray": torch.zeros(2)}), ["has unexpected stray"]),
    "tensors for other layers": (_edit_tensors(_other_layers), ["params.safetensors", "instead of (2, 2"]),
}


@pytest.mark.parametrize("name", ["lkv", "spkv"])
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_learned_checkpoint_is_one_line(tiny_llama, tmp_path, name, case):
    damage, needles = CHECKPOINT_CASES[case]
    d = tmp_path / name
    _checkpoint(name, d, tiny_llama[0])
    damage(d)
    raises_one_line(lambda: methods.build_method(_method_cfg(name, checkpoint=str(d))), *needles)


@pytest.mark.parametrize("name, hparam", [("lkv", "width"), ("lkv", "use_hidden"), ("spkv", "window"),
                                          ("spkv", "feature")])
def test_checkpoint_without_an_hparam_its_method_reads(tiny_llama, tmp_path, name, hparam):
    _checkpoint(name, tmp_path, tiny_llama[0])
    _edit_json("hparams", **{hparam: None})(tmp_path)
    raises_one_line(lambda: methods.build_method(_method_cfg(name, checkpoint=str(tmp_path))), "config.json",
                    f"{hparam}=None")


def test_lkv_budget_logits_of_other_shape_refused_by_the_allocator_alone(tiny_llama, tmp_path):
    _checkpoint("lkv", tmp_path, tiny_llama[0])
    _edit_tensors(lambda t: {**t, "budget_logits": torch.zeros(3, 2)})(tmp_path)
    cfg = _method_cfg("lkv", checkpoint=str(tmp_path), scorer="snapkv")  # learned budgets under another scorer
    raises_one_line(lambda: methods.build_method(cfg), "budget_logits (3, 2) instead of (2, 2)")


def test_spkv_finetuned_tensors_must_be_parameters_of_the_model(tiny_llama, tmp_path):
    model = tiny_llama[0]
    _checkpoint("spkv", tmp_path, model)
    _edit_tensors(lambda t: {**t, "model::model.layers.0.self_attn.o_proj.weight": torch.zeros(3, 3),
                             "model::no.such.weight": torch.zeros(1)})(tmp_path)
    m = methods.build_method(_method_cfg("spkv", checkpoint=str(tmp_path)))
    raises_one_line(lambda: m.scorer.bind_model(model), "model:: tensors", "has unexpected no.such.weight",
                    "o_proj.weight (3, 3) instead of (64, 64)")


@pytest.mark.parametrize("name", ["lkv", "spkv"])
def test_checkpoint_for_another_model_refused_by_every_part(tmp_path, name):
    model, _ = build_tiny("llama")
    _checkpoint(name, tmp_path, model)
    m = methods.build_method(_method_cfg(name, checkpoint=str(tmp_path)))
    other, _ = build_tiny("llama", num_hidden_layers=3)
    parts = [p for p in m.parts if p.input_files()]  # the parts that read the checkpoint
    assert parts
    for part in parts:
        raises_one_line(lambda: part.bind_model(other), "was trained for model tiny-random", "n_layers 2 vs 3")


# -------------------------------------------------------------------------------------------- LU-KV profiles
def _profile_file(tmp_path, **tensor_changes):
    path = tmp_path / "p.safetensors"
    budgets = torch.full((2, 2, 2), 0.25)
    save_profile(path, Profile(budgets, torch.tensor([0.25, 0.5]), {"model": "tiny-random", "n_layers": 2,
                                                                       "n_kv_heads": 2},
                               torch.linspace(0, 1, 11).expand(2, 2, 11).contiguous(), torch.linspace(0, 1, 11)))
    if tensor_changes:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        for k, v in tensor_changes.items():
            if v is None:
                tensors.pop(k)
            else:
                tensors[k] = v
        save_file(tensors, str(path), metadata=meta)
    return path


PROFILE_CASES = {
    "missing": (lambda p: p.unlink(), ["does not exist", "kvbench-profile"]),
    "truncated": (_truncate("p.safetensors"), ["p.safetensors", "truncated or corrupt", "kvbench-profile"]),
    "garbage": (_write("p.safetensors", "not a profile"), ["p.safetensors", "not a kvbench-profile"]),
    "empty": (_write("p.safetensors", b""), ["p.safetensors", "truncated or corrupt"]),
}
PROFILE_TENSOR_CASES = {
    "no budgets": ({"budgets": None}, ["needs budgets", "has none"]),
    "no ratios": ({"ratios": None}, ["lacks ratios"]),
    "extra tensor": ({"stray": torch.zeros(1)}, ["has unexpected stray"]),
    "budgets not 3-d": ({"budgets": torch.zeros(2, 4)}, ["needs budgets", "(2, 4)"]),
    "ratios of other count": ({"ratios": torch.tensor([0.1, 0.2, 0.3])}, ["budgets (2, 2, 2) instead of (3, 2, 2)"]),
    "curves of other heads": ({"curves": torch.zeros(2, 3, 11)}, ["curves (2, 3, 11) instead of (2, 2, 11)"]),
    "budgets for other layers": ({"budgets": torch.zeros(2, 3, 2), "curves": None},
                                 ["metadata says n_layers=2", "3 layers x 2 KV heads"]),
    "ratios out of range": ({"ratios": torch.tensor([0.5, 2.0])}, ["not keep ratios in (0, 1]"]),
    "negative budgets": ({"budgets": torch.full((2, 2, 2), -1.0)}, ["negative or non-finite"]),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_bad_profile_file_is_one_line(tmp_path, case):
    damage, needles = PROFILE_CASES[case]
    path = _profile_file(tmp_path)
    damage(path) if case == "missing" else damage(tmp_path)
    raises_one_line(lambda: methods.build_method(_method_cfg("lukv", profile=str(path))), "method.allocator.profile", *needles)


@pytest.mark.parametrize("case", list(PROFILE_TENSOR_CASES))
def test_profile_with_wrong_tensors_is_one_line(tmp_path, case):
    changes, needles = PROFILE_TENSOR_CASES[case]
    path = _profile_file(tmp_path, **changes)
    raises_one_line(lambda: load_profile(path), "method.allocator.profile", *needles)


def test_profile_for_another_model_refused(tmp_path, tiny_llama):
    path = _profile_file(tmp_path)
    assert load_profile(path).n_layers == 2  # the undamaged file loads
    m = methods.build_method(_method_cfg("lukv", profile=str(path)))
    other, _ = build_tiny("llama", num_hidden_layers=3)
    raises_one_line(lambda: m.allocator.bind_model(other), "method.allocator.profile", "2 layers x 2 KV heads", "3 x 2")
    raises_one_line(lambda: m.allocator.budgets([torch.zeros(2, 40)] * 3, 0.5), "3 layers x 2 KV heads")


# --------------------------------------------------------------------------------------------- LongBench data
LONGBENCH_RECORD = {"input": "Q?", "context": "Some text.", "answers": ["a"], "length": 3, "dataset": "qasper",
                    "language": "en", "all_classes": None, "_id": "x1"}
GOOD_LINE = json.dumps(LONGBENCH_RECORD)
LONGBENCH_CASES = {
    "non-UTF-8 byte": (GOOD_LINE.encode() + b"\n" + GOOD_LINE.replace("text", "t\xe9xt").encode("latin-1"),
                       ["qasper.jsonl:2", "not UTF-8", "0xe9"]),
    "malformed JSON line": (GOOD_LINE + '\n{"input": broken\n', ["qasper.jsonl:2", "malformed JSON"]),
    "line not an object": (GOOD_LINE + "\n[1, 2]\n", ["qasper.jsonl:2", "JSON object is needed", "list"]),
    "line a string": ('"just text"\n', ["qasper.jsonl:1", "JSON object is needed", "str"]),
    "missing context": (json.dumps({k: v for k, v in LONGBENCH_RECORD.items() if k != "context"}),
                        ["qasper.jsonl:1", "missing context"]),
    "missing answers and input": (json.dumps({"context": "c"}), ["qasper.jsonl:1", "missing input, answers"]),
    "answers not a list": (json.dumps({**LONGBENCH_RECORD, "answers": "a"}), ["'answers' must be a list"]),
    "context not a string": (json.dumps({**LONGBENCH_RECORD, "context": {"a": 1}}), ["'context'", "wrong type"]),
    "length not a number": (json.dumps({**LONGBENCH_RECORD, "length": "long"}), ["'length'", "wrong type"]),
    "empty file": ("", ["qasper.jsonl", "holds no LongBench records", "empty"]),
    "blank lines only": ("\n\n  \n", ["qasper.jsonl", "holds no LongBench records"]),
}


@pytest.mark.parametrize("case", list(LONGBENCH_CASES))
def test_bad_longbench_file_is_one_line(enc, tmp_path, case):
    content, needles = LONGBENCH_CASES[case]
    (tmp_path / "qasper.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
    task = tasks.get_task("longbench/qasper", data_dir=str(tmp_path))
    raises_one_line(lambda: task.samples(enc, 512, 1, 0), *needles)


def test_longbench_classification_needs_all_classes(enc, tmp_path):
    (tmp_path / "trec.jsonl").write_text(GOOD_LINE + "\n")
    task = tasks.get_task("longbench/trec", data_dir=str(tmp_path))
    raises_one_line(lambda: task.samples(enc, 512, 1, 0), "trec.jsonl", "record 1", "all_classes")


def test_longbench_data_file_missing_or_unreadable(enc, tmp_path):
    raises_one_line(lambda: tasks.get_task("longbench/qasper", data_dir=str(tmp_path)).samples(enc, 512, 1, 0),
                    "qasper.jsonl", "not found")
    (tmp_path / "qasper.jsonl").mkdir()  # a directory where the file is due
    raises_one_line(lambda: tasks.get_task("longbench/qasper", data_dir=str(tmp_path)).samples(enc, 512, 1, 0),
                    "qasper.jsonl")


# ------------------------------------------------------------------------------------------------ RULER essays
class _Hang(Exception):
    pass


def _no_hang(fn, seconds=60):
    """Run ``fn`` with an alarm: an endless loop fails the test instead of hanging the suite."""
    def alarm(signum, frame):
        raise _Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


ESSAY_CASES = {
    "empty essay": ('{"text": ""}', ["PaulGrahamEssays.json", "no words"]),
    "whitespace essay": ('{"text": " \\n\\t "}', ["PaulGrahamEssays.json", "no words"]),
    "keyless object": ("{}", ["PaulGrahamEssays.json", 'no "text" string', "keys: none"]),
    "other key": ('{"essays": "x"}', ["PaulGrahamEssays.json", 'no "text" string', "'essays'"]),
    "text not a string": ('{"text": ["a", "b"]}', ["PaulGrahamEssays.json", 'no "text" string']),
    "not an object": ('["an essay"]', ["PaulGrahamEssays.json", "JSON object is needed", "list"]),
    "malformed JSON": ('{"text": "an essay', ["PaulGrahamEssays.json", "malformed JSON"]),
    "empty file": ("", ["PaulGrahamEssays.json", "malformed JSON"]),
    "non-UTF-8": (b'{"text": "caf\xe9"}', ["PaulGrahamEssays.json", "not UTF-8", "0xe9"]),
}


@pytest.mark.parametrize("case", list(ESSAY_CASES))
def test_bad_essay_file_is_one_line_without_hanging(enc, tmp_path, case):
    content, needles = ESSAY_CASES[case]
    (tmp_path / "PaulGrahamEssays.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    task = tasks.get_task("ruler/niah_single_2", data_dir=str(tmp_path))
    _no_hang(lambda: raises_one_line(lambda: task.samples(enc, 1024, 1, 0), *needles))


@pytest.mark.parametrize("files, needles", [
    ({}, ["PaulGrahamEssays", "no .txt essays"]),
    ({"a.txt": b"   "}, ["PaulGrahamEssays", "no words"]),
    ({"a.txt": b"Fine text. More.", "b.txt": b"caf\xe9"}, ["b.txt", "not UTF-8"]),
])
def test_bad_essay_folder_is_one_line(enc, tmp_path, files, needles):
    (tmp_path / "PaulGrahamEssays").mkdir()
    for name, data in files.items():
        (tmp_path / "PaulGrahamEssays" / name).write_bytes(data)
    task = tasks.get_task("ruler/niah_single_2", data_dir=str(tmp_path))
    _no_hang(lambda: raises_one_line(lambda: task.samples(enc, 1024, 1, 0), *needles))


def test_essay_task_with_a_data_dir_without_essays_does_not_fall_back(enc, tmp_path):
    task = tasks.get_task("ruler/niah_multikey_1", data_dir=str(tmp_path))
    raises_one_line(lambda: task.samples(enc, 1024, 1, 0), "has no PaulGrahamEssays.json", "drop task.data_dir")
    s = tasks.get_task("ruler/niah_multikey_1").samples(enc, 1024, 1, 0)[0]  # no data_dir: the shipped haystack
    assert s.meta["fallback_haystack"] is True


# ---------------------------------------------------------------------------------------------- RULER QA data
SQUAD_CASES = {
    "malformed JSON": ('{"data": [', ["malformed JSON"]),
    "non-UTF-8": (b'{"data": "\xff"}', ["not UTF-8"]),
    "top level a list": ("[]", ["not in the official SQuAD format", "TypeError"]),
    "no data key": ('{"version": "v2.0"}', ["not in the official SQuAD format", "KeyError"]),
    "paragraphs a string": ('{"data": [{"paragraphs": "text"}]}', ["not in the official SQuAD format"]),
    "qas of strings": ('{"data": [{"paragraphs": [{"context": "c", "qas": ["q"]}]}]}', ["SQuAD format"]),
    "answer not a string": ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": '
                            '[{"text": 3}]}]}]}]}', ["SQuAD format", "string is due"]),
    "no question": ('{"data": []}', ["has no answerable question"]),
}
HOTPOT_CASES = {
    "malformed JSON": ("[{", ["malformed JSON"]),
    "list of strings": ('["q"]', ["not in the official HotpotQA format"]),
    "context not pairs": ('[{"question": "q", "answer": "a", "context": [["t"]]}]', ["HotpotQA format", "ValueError"]),
    "no answer": ('[{"question": "q", "context": [["t", ["s."]]]}]', ["HotpotQA format", "KeyError"]),
    "facts not pairs": ('[{"question": "q", "answer": "a", "context": [["t", ["s."]]], "supporting_facts": [1]}]',
                        ["HotpotQA format"]),
}


@pytest.mark.parametrize("name, file, case", [("qa_1", "dev-v2.0.json", c) for c in SQUAD_CASES]
                         + [("qa_2", "hotpot_dev_distractor_v1.json", c) for c in HOTPOT_CASES])
def test_bad_qa_file_is_one_line(enc, tmp_path, name, file, case):
    content, needles = (SQUAD_CASES if name == "qa_1" else HOTPOT_CASES)[case]
    (tmp_path / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    task = tasks.get_task(f"ruler/{name}", data_dir=str(tmp_path))
    raises_one_line(lambda: task.samples(enc, 1024, 1, 0), file, *needles)


# ---------------------------------------------------------------------------------------------- task.data_dir
@pytest.mark.parametrize("name", ["ruler/niah_single_1", "ruler/niah_single_2", "ruler/qa_1", "longbench/qasper"])
def test_data_dir_that_does_not_exist(tmp_path, name):
    missing = str(tmp_path / "misspelt")
    raises_one_line(lambda: tasks.get_task(name, data_dir=missing), name, f"task.data_dir={missing!r}",
                    "not an existing directory")


@pytest.mark.parametrize("name", ["ruler/niah_single_1", "ruler/niah_multikey_2", "ruler/niah_multikey_3", "ruler/vt",
                                  "ruler/cwe", "ruler/fwe"])
def test_data_dir_given_to_a_task_that_reads_none(tmp_path, name):
    raises_one_line(lambda: tasks.get_task(name, data_dir=str(tmp_path)), name, "reads no data files",
                    "drop task.data_dir")
    assert tasks.get_task(name, suite="ruler", data_dir=str(tmp_path)).data_dir is None  # a suite member: unused


def test_which_tasks_read_data():
    reading = {n for n in tasks.available() if tasks.get_task(n).reads_data}
    essay = {f"ruler/{n}" for n in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                                    "niah_multiquery")}
    assert {n for n in reading if n.startswith("ruler/")} == essay | {"ruler/qa_1", "ruler/qa_2"}
    assert all(n in reading for n in tasks.available() if n.startswith("longbench"))


# --------------------------------------------------------------------------------------------- kvbench-profile
def test_profile_refuses_a_task_it_cannot_build_instead_of_random_tokens(tmp_path, capsys):
    from harness.profile import main

    out = tmp_path / "p.safetensors"
    cases = [(["task=ruler/qa_1"], ["ruler/qa_1 needs SQuAD", "task.data_dir"]),
             (["task=ruler"], ["task='ruler'", "allowed: random"]),
             (["task=ruler/niah_single_1", f"task.data_dir={tmp_path}"], ["reads no data files"])]
    for args, needles in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["model=tiny-random", *args, "context_length=128", "n_samples=1", "grid=4", "ratios=0.5", f"out={out}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("kvbench-profile: error: "), err
        assert all(n in err for n in needles), err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- end to end
def kvbench(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@needs_reference
def test_cli_prints_one_line_for_bad_files(tmp_path, capsys, monkeypatch):
    """The CLI path: a truncated model, an empty LongBench file, an empty essay (it used to hang), a data_dir the
    task does not read. The essay runs as a real subprocess with a timeout (a hang fails the test instead of
    stalling the suite); the others run the command in this process, from the same working dir."""
    from conftest import refused_in_process

    bad_model = _damaged_copy(tmp_path, _truncate("model.safetensors"))
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "trec.jsonl").write_text("")
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "PaulGrahamEssays.json").write_text('{"text": ""}')
    base = ["n_samples=1", "context_length=256", "progress=false", "max_new_tokens=2"]
    runs = [
        (["model=hf", f"model.path={bad_model}", "task=ruler/niah_single_1"], ["model.safetensors", "truncated"]),
        (["model=tiny-random", "task=longbench/trec", f"task.data_dir={tmp_path / 'lb'}"], ["trec.jsonl", "no LongBench"]),
        (["model=tiny-random", "task=ruler/niah_single_1", f"task.data_dir={tmp_path / 'essays'}"],
         ["ruler/niah_single_1 reads no data files"]),
    ]
    monkeypatch.chdir(tmp_path)
    for i, (args, needles) in enumerate(runs):
        line = refused_in_process(capsys, *args, *base, f"hydra.run.dir={tmp_path / f'run{i}'}")
        assert all(n in line for n in needles), (args, line)
    r = kvbench("model=tiny-random", "task=ruler/niah_single_2", f"task.data_dir={tmp_path / 'essays'}", *base,
                f"hydra.run.dir={tmp_path / 'run_essay'}", cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("kvbench: error: "), r.stderr
    assert "no words" in lines[0], lines[0]
