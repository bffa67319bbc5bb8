"""Q-Filters: hand-computed scores, the calibration's direction and sign, the file formats and their checks (kvpress
0.5.5's QFilterPress on the tiny models with the same local filter files: tests/test_conformance_extra.py, group
qfilter)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import layer_inputs, refused_in_process

import methods
from harness.errors import KvbenchError
from methods.qfilter import _QueryStats, load_filters, save_filters

ROOT = Path(__file__).resolve().parent.parent


def _file(tmp_path, filters, meta=None, name="f.safetensors"):
    if meta is None:  # the published format: the tensor alone, no metadata
        from safetensors.torch import save_file

        save_file({"q_filters": filters}, str(tmp_path / name))
        return tmp_path / name
    return save_filters(tmp_path / name, filters, meta)


def test_scores_are_minus_the_key_projection_on_the_filter(tmp_path):
    # one layer, two heads, head_dim 2; head 0 filter (1, 0), head 1 filter (0, -2)
    path = _file(tmp_path, torch.tensor([[[1.0, 0.0], [0.0, -2.0]]]))
    method = methods.load("qfilter", f"scorer.filters={path}")
    keys = torch.tensor([[[[3.0, 1.0], [-1.0, 5.0], [0.5, 0.5], [2.0, -4.0]],
                          [[3.0, 1.0], [-1.0, 5.0], [0.5, 0.5], [2.0, -4.0]]]])
    scores = method.scorer.score(layer_inputs(torch.zeros(1, 4, 4, 2), keys))
    assert scores[0].tolist() == [[-3.0, 1.0, -0.5, -2.0], [2.0, 10.0, 1.0, -8.0]]
    _, kept = method.plan([scores], 0.5)
    assert kept[0].tolist() == [[1, 2], [0, 1]]


def test_calibration_finds_the_main_query_direction_and_stores_it_negated():
    # queries of head 0 along +x, of head 1 along -y (plus small noise): u = +x and -y, stored as -u
    gen = torch.Generator().manual_seed(0)
    stats = _QueryStats()

    class _M:
        layer_idx = 0

    q = torch.randn(1, 4, 50, 3, generator=gen) * 0.1  # 4 query heads, 2 KV heads (g = 2)
    q[:, :2, :, 0] += 2.0
    q[:, 2:, :, 1] -= 3.0
    k = torch.randn(1, 2, 50, 3, generator=gen)
    stats(_M(), q, k, k, 1.0)
    f = stats.filters()[0]
    assert f[0].tolist() == pytest.approx([-1.0, 0.0, 0.0], abs=0.02)
    assert f[1].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=0.02)
    # so that a key along the queries' direction scores highest (score = -<f, k>): what the attention favours
    keys = torch.tensor([[[[1.0, 0, 0], [-1.0, 0, 0]], [[0, -1.0, 0], [0, 1.0, 0]]]])
    scores = -(f[None, :, None, :] * keys).sum(-1)
    assert scores[0, :, 0].gt(scores[0, :, 1]).all()


def _reference():
    from omegaconf import OmegaConf

    from harness.models import load_model

    return load_model(OmegaConf.create({"name": "reference", "family": "llama", "path": None, "dtype": "float32",
                                        "device": "cpu", "chat": False}))[0]


def test_calibrated_filters_rank_keys_by_the_attention_they_get():
    """On the reference model, the score of a context key correlates with the attention the queries give it
    (the sign of the stored filter is the one kvpress's rule needs; the flipped sign anti-correlates)."""
    from methods._calibration import attention_function, causal_attention, random_prompts
    from methods.qfilter import calibrate

    model = _reference()
    prompts = random_prompts(model.config.vocab_size, 3, 512, seed=1)
    filters = calibrate(model, prompts[:2])
    assert filters.shape == (4, 2, 32) and torch.allclose(filters.norm(dim=-1), torch.ones(4, 2), atol=1e-5)
    corr = []

    def probe(module, q, k, v, scaling):
        g = q.shape[1] // k.shape[1]
        logits = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scaling
        logits = logits + torch.full(logits.shape[-2:], float("-inf")).triu(1)
        # what the last 64 queries give the keys before them (the keys a later question would read)
        att = logits.softmax(-1)[0, :, -64:, :-64].mean(1).reshape(k.shape[1], g, -1).mean(1)  # [H_kv, T - 64]
        s = -(filters[module.layer_idx][:, None, :] * k[0, :, :-64]).sum(-1)
        for h in range(k.shape[1]):
            r = torch.stack([att[h].argsort().argsort(), s[h].argsort().argsort()]).float()
            corr.append(float(torch.corrcoef(r)[0, 1]))
        return causal_attention(q, k, v, scaling)

    with torch.no_grad(), attention_function(model, probe):
        model(input_ids=torch.tensor([prompts[2]]), use_cache=False)
    assert sum(corr) / len(corr) > 0.2, corr


def test_file_formats_and_model_checks(tmp_path, tiny_llama):
    model, _ = tiny_llama
    good = torch.randn(2, 2, 16)
    # the published format (no metadata), as a file and as a hub snapshot dir holding model.safetensors
    (tmp_path / "hub").mkdir()
    _file(tmp_path / "hub", good, name="model.safetensors")
    for path in (_file(tmp_path, good), tmp_path / "hub"):
        scorer = methods.load("qfilter", f"scorer.filters={path}").scorer
        scorer.bind_model(model)
        assert torch.equal(scorer.filters, good)
    # another shape is refused in one line naming the command that makes the right file
    wrong = methods.load("qfilter", f"scorer.filters={_file(tmp_path, torch.randn(3, 2, 16), name='w.safetensors')}")
    with pytest.raises(KvbenchError, match=r"3 layers x 2 KV heads x head_dim 16; this model has 2 x 2 x 16"):
        wrong.bind_model(model)
    # our file records the model: another model of the same shape (another family) is refused
    from harness.models import build_tiny, model_identity

    ours = _file(tmp_path, good, {**model_identity(model), "model": ""}, name="ours.safetensors")
    other, _ = build_tiny("qwen3")
    with pytest.raises(KvbenchError, match="model_type llama vs qwen3"):
        methods.load("qfilter", f"scorer.filters={ours}").bind_model(other)
    # damaged, missing and foreign files
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    for path, msg in [(tmp_path / "bad.safetensors", "not a readable safetensors"), (tmp_path / "none", "does not exist"),
                      (_file(tmp_path, torch.randn(2, 16), name="2d.safetensors"), r"not a float tensor")]:
        with pytest.raises(KvbenchError, match=msg):
            load_filters(path)


def test_default_filters_shipped_for_the_reference_model_else_calibrated_at_load(tiny_llama):
    ref = _reference()
    scorer = methods.load("qfilter").scorer
    scorer.bind_model(ref)
    assert scorer.source.startswith("shipped") and scorer.input_files()["method.scorer.filters"].name == "qfilters.safetensors"
    tiny = methods.load("qfilter").scorer
    tiny.bind_model(tiny_llama[0])
    again = methods.load("qfilter").scorer
    again.bind_model(tiny_llama[0])
    assert tiny.source.startswith("calibrated at load") and tiny.input_files() == {}
    assert tiny.filters.shape == (2, 2, 16) and torch.equal(tiny.filters, again.filters)


def test_a_bad_filters_value_is_one_line(capsys, tmp_path):
    line = refused_in_process(capsys, "method=qfilter", "method.scorer.filters=/no/such.safetensors",
                              "model=tiny-random", "n_samples=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert "method.scorer.filters" in line and "does not exist" in line and not (tmp_path / "run").exists()


def test_the_command_writes_filters_that_the_method_reads(tmp_path):
    out = tmp_path / "tiny.safetensors"
    proc = subprocess.run([sys.executable, "-m", "methods.qfilter", "model=tiny-random", "task=random", "n_samples=2",
                           "context_length=64", f"out={out}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    filters, meta = load_filters(out)
    assert filters.shape == (2, 2, 16) and meta["format"] == "kvbench-qfilters/1" and meta["task"] == "random"
    bad = subprocess.run([sys.executable, "-m", "methods.qfilter", "model=tiny-random", "outt=x"], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
