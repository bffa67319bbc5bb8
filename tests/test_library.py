"""The library API (``import kvbench``): generate equals the command's prediction for the same sample, compress
prunes a user's own prefill to the command's counts (ragged where heads differ) and the user's decoding loop on it
gives the command's tokens, run is the command (same run dirs, same errors), method builds the command's configs,
user config dirs, --version, and the README's "Use it as a library" block runs as it stands."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvbench
from harness.cache import RaggedLayer
from harness.compat import with_cache
from harness.compress import n_keep

ROOT = Path(__file__).resolve().parent.parent
TASK = "ruler/niah_single_1"
BASE = ["model=reference", f"task={TASK}", "context_length=1024", "n_samples=2", "progress=false"]


@pytest.fixture(scope="module")
def reference():
    return kvbench.load_model("reference")


def rows(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra, query_aware", [
    ("snapkv", {}, False),
    ("snapkv_adakv", {}, True),  # ragged heads, question prefilled with the context
    ("snapkv", {"preset": "kvpress"}, False),  # a preset through both spellings
])
def test_generate_equals_the_commands_prediction(tmp_path, monkeypatch, reference, method, extra, query_aware):
    monkeypatch.chdir(tmp_path)
    overrides = [f"method.{k}={v}" for k, v in extra.items()]
    result = kvbench.run([*BASE, f"method={method}", "keep_ratio=0.25", f"query_aware={str(query_aware).lower()}",
                          *overrides, "hydra.run.dir=run"])
    (run,) = result["runs"]
    assert Path(run["dir"]) == tmp_path / "run" and result["failed"] == []
    written = rows(run["dir"])
    assert len(written) == 2 and run["metrics"]  # the command's rows and metrics
    model, tokenizer = reference
    chosen = kvbench.method(method, keep_ratio=0.25, **extra)
    samples = kvbench.samples(TASK, tokenizer, context_length=1024, n_samples=2, seed=0)
    assert [s.sample_id for s in samples] == [r["sample_id"] for r in written]
    for sample, row in zip(samples, written):
        answer, stats = kvbench.generate(model, tokenizer, sample.context, sample.question, chosen,
                                         max_new_tokens=sample.max_new_tokens, query_aware=query_aware,
                                         answer_prefix=sample.answer_prefix, return_stats=True)
        assert answer == row["prediction"]
        for key in ("context_tokens", "kept_tokens", "kv_bytes", "kv_bytes_full", "budgets"):
            assert stats[key] == row[key], key
    if not extra:  # the reference model retrieves at its own defaults: equal answers are real answers
        assert any(r["score"] == 1.0 for r in written)


def test_generate_takes_token_ids_and_the_full_method(reference):
    from tasks.base import PromptEncoder

    model, tokenizer = reference
    (sample,) = kvbench.samples(TASK, tokenizer, context_length=1024)
    ctx_ids, q_ids = PromptEncoder(tokenizer).encode(sample.context, sample.question, sample.answer_prefix)
    snapkv = kvbench.method("snapkv", keep_ratio=0.25)
    text = kvbench.generate(model, tokenizer, sample.context, sample.question, snapkv, max_new_tokens=12,
                            answer_prefix=sample.answer_prefix)
    assert kvbench.generate(model, tokenizer, ctx_ids, q_ids, snapkv, max_new_tokens=12) == text
    assert kvbench.generate(model, tokenizer, torch.tensor([ctx_ids]), q_ids, snapkv, max_new_tokens=12) == text
    full, stats = kvbench.generate(model, tokenizer, ctx_ids, q_ids, "full", max_new_tokens=12, return_stats=True)
    assert sample.answers[0] in full and stats["kv_bytes"] == stats["kv_bytes_full"]
    with pytest.raises(kvbench.KvbenchError, match="both text or both token ids"):
        kvbench.generate(model, tokenizer, sample.context, q_ids, snapkv)


def greedy_loop(model, cache, logits, n: int, tail: list[int] | None = None) -> list[int]:
    """A user's own loop: an optional multi-token step, then one token at a time, no positions passed."""
    if tail:
        logits = model(torch.tensor([tail]), **with_cache(cache), use_cache=True).logits[:, -1]
    tokens = [int(logits.argmax(-1))]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), **with_cache(cache), use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def until_eos(tokens: list[int], model, tokenizer) -> list[int]:
    from harness.pipeline import eos_ids

    eos = eos_ids(model, tokenizer)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


@pytest.mark.parametrize("query_aware", [False, True])
def test_compress_prunes_a_users_prefill_to_the_commands_counts(reference, query_aware):
    from tasks.base import PromptEncoder

    model, tokenizer = reference
    (sample,) = kvbench.samples(TASK, tokenizer, context_length=1024)
    ctx_ids, q_ids = PromptEncoder(tokenizer).encode(sample.context, sample.question, sample.answer_prefix)
    prompt = ctx_ids + q_ids if query_aware else ctx_ids
    ratio = 0.3
    snapkv = kvbench.method("snapkv", keep_ratio=ratio)
    cache = DynamicCache()
    with kvbench.compress(model, snapkv) as press, torch.no_grad():
        out = model(torch.tensor([prompt]), **with_cache(cache), use_cache=True)
        expected = n_keep(len(prompt), ratio)
        assert expected == math.floor(len(prompt) * ratio)
        assert all(layer.keys.shape[-2] == expected for layer in cache.layers)  # pruned in place, every head
        assert press.kept_per_head == [[expected] * 2] * 4 and press.n_tokens == len(prompt)
        assert press.position(cache) == len(prompt)
        tokens = greedy_loop(model, cache, out.logits[:, -1], 10, None if query_aware else q_ids)
        assert press.position(cache) == len(ctx_ids) + len(q_ids) + 9
    # the user's loop decodes what the command decodes (positions continue after the prompt, not the cache size)
    answer = kvbench.generate(model, tokenizer, ctx_ids, q_ids, snapkv, max_new_tokens=10, query_aware=query_aware)
    assert tokenizer.decode(until_eos(tokens, model, tokenizer), skip_special_tokens=True) == answer
    assert sample.answers[0] in answer


@pytest.mark.parametrize("name", ["asl", "spkv", "lkv", "lukv"])
def test_compress_runs_the_methods_own_hooks_as_the_command_does(reference, name):
    """ASL's prefill patch (a shortened prefill), SP-KV's decode patch (gates on new entries), LKV's learned scorer
    and LU-KV's profile allocator: the user's loop under compress decodes the command's tokens."""
    from tasks.base import PromptEncoder

    model, tokenizer = reference
    (sample,) = kvbench.samples(TASK, tokenizer, context_length=1024)
    ctx_ids, q_ids = PromptEncoder(tokenizer).encode(sample.context, sample.question, sample.answer_prefix)
    chosen = kvbench.method(name, keep_ratio=0.25)
    cache = DynamicCache()
    with kvbench.compress(model, chosen) as press, torch.no_grad():
        out = model(torch.tensor([ctx_ids]), **with_cache(cache), use_cache=True)
        assert press.kv_bytes < press.kv_bytes_full
        tokens = greedy_loop(model, cache, out.logits[:, -1], 10, q_ids)
    answer = kvbench.generate(model, tokenizer, ctx_ids, q_ids, chosen, max_new_tokens=10)
    assert tokenizer.decode(until_eos(tokens, model, tokenizer), skip_special_tokens=True) == answer


def test_compress_gives_ragged_layers_that_sum_to_the_uniform_total(reference):
    model, tokenizer = reference
    (sample,) = kvbench.samples(TASK, tokenizer, context_length=1024)
    ids = tokenizer(sample.context, return_tensors="pt").input_ids
    T = ids.shape[1]
    adakv = kvbench.method("snapkv_adakv", keep_ratio=0.25)
    cache = DynamicCache()
    with kvbench.compress(model, adakv) as press, torch.no_grad():
        out = model(ids, **with_cache(cache), use_cache=True)
        assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
        sizes = [layer.lengths for layer in cache.layers]
        assert sizes == press.kept_per_head and len({n for layer in sizes for n in layer}) > 1  # heads differ
        assert all(sum(layer) == 2 * n_keep(T, 0.25) for layer in sizes)  # a layer's total is uniform's
        assert press.kv_bytes < press.kv_bytes_full / 3
        greedy_loop(model, cache, out.logits[:, -1], 4)  # decoding on ragged layers
        assert [layer.lengths for layer in cache.layers] == [[n + 3 for n in layer] for layer in sizes]
    # outside the block the model is as it was: its own attention, no hooks
    assert model.config._attn_implementation == "sdpa"
    assert not model.get_decoder()._forward_hooks and not model.get_decoder()._forward_pre_hooks


def test_method_builds_the_commands_configs():
    snapkv = kvbench.method("snapkv", keep_ratio=0.25)
    assert snapkv.keep_ratio == 0.25 and snapkv.scorer.window == 32 and snapkv.budget_rule == "floor"
    kvpress = kvbench.method("snapkv", preset="kvpress", compression_ratio=0.75)
    assert kvpress.scorer.window == 64 and kvpress.budget_rule == "kvpress" and kvpress.keep_ratio == 1.0 - 0.75
    swapped = kvbench.method("snapkv", "allocator=adakv", "scorer.window=16", keep_ratio=0.5)
    assert swapped.name == "snapkv+adakv" and swapped.scorer.window == 16
    short = kvbench.method("snapkv", window=16, n_recent=16)  # a part's key by its short name, a selector key
    assert short.scorer.window == 16 and short.selector.n_recent == 16
    assert "snapkv" in kvbench.methods() and "reference" in kvbench.models() and TASK in kvbench.tasks()
    for bad, needle in [({"keep_ratio": 0}, "keep_ratio=0 is out of range"),
                        ({"keep_ratio": 0.5, "compression_ratio": 0.5}, "exclude each other"),
                        ({"windw": 3}, "windw"), ({"window": 0}, "method.scorer.window")]:
        with pytest.raises(kvbench.KvbenchError, match=needle) as err:
            kvbench.method("snapkv", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(kvbench.KvbenchError, match="method='nope' is not known"):
        kvbench.method("nope")


def test_load_model_by_name_path_and_keys():
    model, tokenizer = kvbench.load_model("tiny-random", family="qwen3")
    assert model.config.model_type == "qwen3"
    reference_dir = ROOT / "harness" / "reference" / "checkpoint"
    model, _ = kvbench.load_model(reference_dir, dtype="bfloat16")  # a checkpoint dir: model=hf
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 4
    with pytest.raises(kvbench.KvbenchError, match="dtyp=.* is not a key of model=tiny-random"):
        kvbench.load_model("tiny-random", dtyp="float32")
    with pytest.raises(kvbench.KvbenchError, match="model.dtype='float8'"):
        kvbench.load_model("tiny-random", dtype="float8")
    with pytest.raises(kvbench.KvbenchError, match="does not exist"):
        kvbench.load_model("./models/none-such")
    with pytest.raises(kvbench.KvbenchError, match="not in the local Hugging Face cache"):
        kvbench.load_model("nobody/none-such")  # a hub id: never downloaded


def test_run_raises_the_commands_errors_and_leaves_no_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kvbench.KvbenchError, match=r"method='nope' is not known; allowed: .*snapkv"):
        kvbench.run(["model=tiny-random", "method=nope"])
    with pytest.raises(kvbench.KvbenchError, match="keep_ratio=2"):
        kvbench.run(["model=tiny-random", "keep_ratio=2"])
    assert not (tmp_path / "results").exists()
    # the command prints the same line
    from harness import cli

    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["model=tiny-random", "method=nope"])
    assert sys.argv == argv and exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("kvbench: error: method='nope' is not known")


def test_run_writes_below_the_working_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kvbench.run(["model=tiny-random", "method=snapkv", "keep_ratio=0.5", f"task={TASK}", "n_samples=1",
                          "context_length=512", "max_new_tokens=2", "progress=false"])
    (run,) = result["runs"]
    assert Path(run["dir"]).parent == tmp_path / "results" / "runs"
    assert len(rows(run["dir"])) == 1 and run["metrics"]["snapkv"]["0.5"]["n"] == 1


def test_a_sweep_with_a_bad_job_runs_the_others_then_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kvbench.SweepFailed, match=r"1 job\(s\) of the sweep failed .*context_length=100000") as err:
        kvbench.run(["-m", "model=tiny-random", "method=snapkv", "keep_ratio=0.5", f"task={TASK}", "n_samples=1",
                     "context_length=512,100000", "max_new_tokens=2", "progress=false", "hydra.sweep.dir=sweep"])
    (run,) = err.value.result["runs"]
    assert "context_length=512" in run["overrides"] and len(rows(run["dir"])) == 1
    (failed,) = err.value.result["failed"]
    assert "larger than the model's maximum" in failed["error"]


def test_user_config_dir_adds_methods_to_the_command_and_the_library(tmp_path, monkeypatch):
    import conf

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my_conf"
    (mine / "method").mkdir(parents=True)
    (mine / "method" / "snap16.yaml").write_text(
        "defaults: [_common, {scorer: snapkv}, {allocator: adakv}, _self_]\nname: snap16\n"
        "scorer: {window: 16}\nselector: {n_recent: 16}\n")
    run = ["model=tiny-random", "method=snap16", "keep_ratio=0.5", f"task={TASK}", "n_samples=1",
           "context_length=512", "max_new_tokens=2", "progress=false"]
    with pytest.raises(kvbench.KvbenchError, match="method='snap16' is not known"):
        kvbench.run(run)
    for spelling in (["--config-dir", str(mine)], [f"hydra.searchpath=[file://{mine}]"]):
        result = kvbench.run([*spelling, *run, "overwrite=true"])
        (made,) = result["runs"]
        assert {r["method"] for r in rows(made["dir"])} == {"snap16+adakv"}
    assert conf.user_dirs() == []  # a command's dirs are its own
    before = conf.user_dirs()
    try:
        kvbench.add_config_dir(mine)
        assert "snap16" in kvbench.methods()
        built = kvbench.method("snap16", keep_ratio=0.5)
        assert built.scorer.window == 16 and built.selector.n_recent == 16
        clash = tmp_path / "clash" / "method"
        clash.mkdir(parents=True)
        (clash / "snapkv.yaml").write_text("name: snapkv\n")
        with pytest.raises(kvbench.KvbenchError, match="method/snapkv.yaml, a name kvbench's own configs use"):
            kvbench.add_config_dir(clash.parent)
    finally:
        conf.set_user_dirs(before)


def test_version_and_python_m(capsys):
    from harness import cli

    cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"kvbench {kvbench.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", kvbench.__version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "kvbench.__version__"}' in pyproject


def readme_library_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Use it as a library\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = readme_library_block()
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md (Use it as a library)", "exec"), namespace)
    printed = capsys.readouterr().out
    sample, answer = namespace["sample"], namespace["answer"]
    assert sample.answers[0] in answer  # the reference model finds the needle at keep ratio 0.25
    assert sample.answers[0] in namespace["tokenizer"].decode(namespace["tokens"])  # so does the user's loop
    assert sorted(Path(r["dir"]).name.split("method=")[1].split(",")[0] for r in namespace["result"]["runs"]) \
        == ["full", "snapkv"]
    assert all(Path(r["dir"]).is_relative_to(tmp_path / "results" / "sweeps" / "library")
               for r in namespace["result"]["runs"])
    assert sample.answers[0] in printed
