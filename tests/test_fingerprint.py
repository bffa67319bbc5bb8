"""Run dirs remember which weights made their rows: resuming after the model or a method's checkpoint was
retrained at the same path is refused (the dir untouched), resuming with the same files goes on."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness import fingerprint
from harness.errors import KvbenchError
from harness.fingerprint import file_digest, path_digest, run_inputs
from harness.runner import prepare_dir


def test_file_digest_follows_content(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"x" * 1000)
    assert file_digest(a) == file_digest(b)
    b.write_bytes(b"x" * 999 + b"y")
    assert file_digest(a) != file_digest(b)


def test_large_file_digest_reads_pieces_and_sees_a_changed_middle(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_LIMIT", 10)
    monkeypatch.setattr(fingerprint, "PIECE", 4)
    f = tmp_path / "shard.safetensors"
    f.write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    before = file_digest(f)
    f.write_bytes(b"abcdefghijklmZopqrstuvwxyz")  # byte 13 = size // 2: inside the middle piece
    assert file_digest(f) != before


def test_dir_digest_ignores_training_state_and_notes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "params.safetensors").write_bytes(b"w1")
    d = path_digest(tmp_path)
    (tmp_path / "train_state.pt").write_bytes(b"optimizer")
    (tmp_path / "README.md").write_text("card")
    assert path_digest(tmp_path) == d
    (tmp_path / "params.safetensors").write_bytes(b"w2")
    assert path_digest(tmp_path) != d


def test_run_inputs_names_model_and_method_files(tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.models import build_tiny

    model, _ = build_tiny("llama", num_hidden_layers=1)
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")

    class Part:  # a method part that read one file
        def __init__(self, key, path):
            self.files = {key: path}

        def input_files(self):
            return self.files

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "params.safetensors").write_bytes(b"p")
    inputs = run_inputs(loaded, (Part("method.checkpoint", ck), None))
    assert set(inputs) == {"model", "method.checkpoint"}
    assert inputs["method.checkpoint"] == path_digest(ck)
    assert run_inputs(model, (None, None)) == {}  # built from a config, no method files: nothing on disk


REPO_DIR = Path(__file__).resolve().parent.parent


def test_learned_methods_report_the_files_they_loaded():
    """LKV (scorer and allocator), SP-KV and LU-KV name the checkpoint / profile they resolved and read."""
    import methods

    lkv, spkv, lukv = methods.load("lkv"), methods.load("spkv"), methods.load("lukv")
    lkv_dir = (REPO_DIR / "harness/reference/lkv").resolve()
    assert lkv.scorer.input_files() == {"method.scorer.checkpoint": lkv_dir}
    assert lkv.allocator.input_files() == {"method.allocator.checkpoint": lkv_dir}
    assert spkv.scorer.input_files() == {"method.scorer.checkpoint": (REPO_DIR / "harness/reference/spkv").resolve()}
    assert Path(lukv.allocator.input_files()["method.allocator.profile"]).resolve() == (
        REPO_DIR / "harness/reference/lukv_profile.safetensors").resolve()


def run_config(method: str):
    return OmegaConf.create({"method": {"name": method}, "seed": 0, "keep_ratio": 0.5, "context_length": 512,
                             "n_samples": 1, "query_aware": False, "model": {"name": "tiny-random"},
                             "task": {"name": "ruler/niah_single_1"}})


def test_resume_refused_after_weights_changed(tmp_path):
    cfg = run_config("lkv")
    out = tmp_path / "run"
    prepare_dir(out, cfg, {"model": "aaaa", "method.checkpoint": "cccc"})
    (out / "predictions.jsonl").write_text('{"row": 1}\n')
    before = (out / "config.yaml").read_text()
    prepare_dir(out, cfg, {"model": "aaaa", "method.checkpoint": "cccc"})  # same files: resumes
    with pytest.raises(KvbenchError, match=r"method\.checkpoint changed since.*overwrite=true") as err:
        prepare_dir(out, cfg, {"model": "aaaa", "method.checkpoint": "dddd"})
    assert "\n" not in str(err.value)
    assert (out / "config.yaml").read_text() == before
    assert (out / "predictions.jsonl").read_text() == '{"row": 1}\n'
    prepare_dir(out, OmegaConf.merge(cfg, {"overwrite": True}), {"model": "bbbb"})  # discards the old rows
    assert not (out / "predictions.jsonl").exists()


def test_dir_from_before_fingerprints_still_resumes(tmp_path):
    cfg = run_config("full")
    out = tmp_path / "run"
    prepare_dir(out, cfg)  # as written before run dirs recorded inputs
    prepare_dir(out, cfg, {"model": "aaaa"})
    assert OmegaConf.load(out / "config.yaml").inputs.model == "aaaa"
    with pytest.raises(KvbenchError, match="different config"):
        prepare_dir(out, OmegaConf.merge(cfg, {"seed": 1}), {"model": "aaaa"})


def test_input_files_are_found_in_the_working_dir_first_then_in_the_repository(tmp_path, monkeypatch):
    from harness.paths import REPO_ROOT, find_input
    from methods.lukv import resolve_profile

    monkeypatch.chdir(tmp_path)
    shipped = "harness/reference/lukv_profile.safetensors"
    assert find_input(shipped) == (REPO_ROOT / shipped).resolve()  # not in the working dir: the repository's
    (tmp_path / "harness/reference").mkdir(parents=True)
    (tmp_path / shipped).write_bytes(b"x")
    assert find_input(shipped) == (tmp_path / shipped).resolve()  # the working dir's copy wins
    assert find_input(tmp_path / shipped, lambda p: False) is None
    assert find_input("no/such/file") is None
    assert resolve_profile("no/such/file") == Path("no/such/file")  # load_profile then names it as given
