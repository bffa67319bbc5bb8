#!/usr/bin/env bash
# Every number the README and the model card report for the shipped reference model, from scratch:
#   bash scripts/reference_results.sh [step ...]   (steps: eval learned profile validate sweep qa asl orders kvpress;
#   default all)
# Evaluation samples use seeds < 1000 (RULER's per-sample seeds derive from seed=0); everything trained or
# profiled here (the reference model, LKV, SP-KV, the LU-KV profile) uses seeds >= 1,000,000.
# Outputs go under results/reference/ (a rerun resumes the sweeps: finished rows are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${VENV:-.venv}/bin
OUT=results/reference
mkdir -p "$OUT"
steps=${*:-eval learned profile validate sweep qa asl orders kvpress}
has() { [[ " $steps " == *" $1 "* ]]; }

if has eval; then  # issue 5's bars: plain greedy decoding, no harness method in the way
  $B/python -m harness.reference.evaluate --tasks niah_single_1,niah_multikey_1,vt --lengths 4096 --n 50 \
    --json "$OUT/eval_4096.json"
  $B/python -m harness.reference.evaluate --tasks niah_single_1 --lengths 8192 --n 50 --json "$OUT/eval_8192.json"
fi

if has learned; then  # LKV and SP-KV trained on the shipped model (frozen), on training seeds
  # multikey twice in the rotation: keeping every one of several needles is what LKV missed most at 1200 steps;
  # the scorer also reads the layer's input hidden state (use_hidden), which is what brought vt close to full
  $B/kvbench-train method=lkv model=reference out=harness/reference/lkv steps=2000 lkv.use_hidden=true \
    'data.tasks=[ruler/niah_single_1,ruler/niah_multikey_1,ruler/niah_multikey_1,ruler/vt]' \
    'data.context_length=[2048,4096]' overwrite=true threads=2 progress=false
  # SP-KV on the evaluation length (2k-4k; at 1k-2k it kept too few digits of the needles at 4k), the same
  # rotation; 1400 steps chosen over 800 on the validation step below (the learning rate is constant, so the
  # shipped run, 800 steps resumed to 1400, is this command's run)
  $B/kvbench-train method=spkv model=reference out=harness/reference/spkv steps=1400 spkv.sparsity_weight=0.05 \
    'data.tasks=[ruler/niah_single_1,ruler/niah_multikey_1,ruler/niah_multikey_1,ruler/vt]' \
    'data.context_length=[2048,4096]' overwrite=true threads=2 progress=false
fi

if has profile; then  # LU-KV's offline profiles, calibration on training seeds: one per within-head order
  # (a head's utility curve depends on which entries its order keeps)
  $B/kvbench-profile model=reference method=lukv task=ruler/niah_single_1 context_length=4096 n_samples=8 \
    seed=1000000 out=harness/reference/lukv_profile.safetensors
  $B/kvbench-profile model=reference method=lukv_lkv task=ruler/niah_single_1 context_length=4096 n_samples=8 \
    seed=1000000 out=harness/reference/lukv_lkv_profile.safetensors
  # HeadKV's retrieval-reasoning head scores (methods/headkv.py): variable tracking, kvbench's reasoning needle
  $B/python -m methods.headkv model=reference task=ruler/vt context_length=4096 n_samples=20 seed=1000000 \
    out=harness/reference/headkv_scores.json
fi

RATIOS='keep_ratio=[0.1,0.15,0.2,1.0]'
TASKS=task=ruler/niah_single_1,ruler/niah_multikey_1,ruler/vt
# The validate / sweep / qa / asl numbers of docs/reference-model.md were measured with kvbench's earlier fill rule
# for RULER lengths (task.length_rule=kvbench), before official RULER's rule became the default; RULE= (empty)
# reruns them under the official rule. eval and orders use the official rule.
RULE=${RULE-task.length_rule=kvbench}
if has validate; then  # choosing among trained variants: samples of seed 500000 (neither evaluation nor training)
  $B/kvbench -m model=reference $RULE $TASKS method=full,spkv context_length=4096 n_samples=50 seed=500000 \
    progress=false hydra.sweep.dir=$OUT/validation
  $B/kvbench-report $OUT/validation
fi
if has sweep; then  # issue 5 (SnapKV vs random, keep 1.0 = full) and issue 9's table, n=50 per task
  $B/kvbench -m model=reference $RULE $TASKS method=full keep_ratio=1.0 context_length=4096 n_samples=50 \
    progress=false hydra.sweep.dir=$OUT/ruler4k
  $B/kvbench -m model=reference $RULE $TASKS method=random,snapkv,snapkv_adakv,lkv "$RATIOS" \
    context_length=4096 n_samples=50 progress=false hydra.sweep.dir=$OUT/ruler4k
  $B/kvbench -m model=reference $RULE $TASKS method=spkv context_length=4096 n_samples=50 progress=false \
    hydra.sweep.dir=$OUT/ruler4k
fi

if has qa; then  # query-aware (the question in the prefill, SnapKV's own setting): SnapKV vs random
  $B/kvbench -m model=reference $RULE task=ruler/niah_single_1 method=random,snapkv "$RATIOS" query_aware=true \
    context_length=4096 n_samples=50 progress=false hydra.sweep.dir=$OUT/ruler4k_query_aware
  $B/kvbench-report $OUT/ruler4k_query_aware
fi

if has asl; then  # issue 8: ASL and LU-KV beside SnapKV at the same budgets (ASL prefills once per ratio)
  $B/kvbench -m model=reference $RULE $TASKS method=asl 'keep_ratio=[0.1,0.2]' context_length=4096 n_samples=20 \
    progress=false hydra.sweep.dir=$OUT/ruler4k
  $B/kvbench -m model=reference $RULE $TASKS method=lukv method.allocator.profile=harness/reference/lukv_profile.safetensors \
    'keep_ratio=[0.1,0.2]' context_length=4096 n_samples=20 progress=false hydra.sweep.dir=$OUT/ruler4k
  for t in niah_single_1 niah_multikey_1 vt; do  # prefill time on the sweep's own prompts (keep 0.1)
    $B/python benchmarks/asl_prefill.py --model reference --task ruler/$t --samples 5 --repeats 5 --context 4096 \
      --json "$OUT/asl_prefill_$t.json"
  done
fi

if has orders; then  # issue 20: LU-KV's budgets under two within-head orders, beside LKV and the full cache (n = 20)
  # LU-KV as published (ExpectedAttention order, which keeps no needle on this model: the label says so), and
  # LU-KV's budgets profiled and used with LKV-T's order, which works here (conf/method/lukv_lkv.yaml)
  $B/kvbench -m model=reference $TASKS method=lukv 'method.label="lukv (EA order fails here)"' \
    'keep_ratio=[0.1,0.2]' context_length=4096 n_samples=20 progress=false hydra.sweep.dir=$OUT/lukv_orders
  $B/kvbench -m model=reference $TASKS method=lukv_lkv,lkv 'keep_ratio=[0.1,0.2]' context_length=4096 n_samples=20 \
    progress=false hydra.sweep.dir=$OUT/lukv_orders
  $B/kvbench -m model=reference $TASKS method=full keep_ratio=1.0 context_length=4096 n_samples=20 progress=false \
    hydra.sweep.dir=$OUT/lukv_orders
  $B/kvbench-report $OUT/lukv_orders
fi

if has kvpress; then  # issue 11: the kvpress leaderboard grid on the reference model, a quick check
  $B/kvbench-reproduce kvpress_ruler4k model=reference n_samples=1 progress=false  # qa_1/qa_2 out: conf/paper_model
fi

if [[ -d $OUT/ruler4k ]]; then $B/kvbench-report $OUT/ruler4k; fi  # absent when only eval/learned/profile ran
