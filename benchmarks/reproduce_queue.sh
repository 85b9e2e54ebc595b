#!/usr/bin/env bash
# The reproduction rows still to run (issues "Reproduction v2" and "Beyond PRUNE"), one resumable command each, in
# the order they are worth running. Every command continues where it stopped (state in benchmarks/results/reproduce/
# *.pt, local) and appends its rows (*.jsonl, commit them as they complete). Run it whole, or one line at a time:
#
#   bash benchmarks/reproduce_queue.sh            # everything, sequentially (many hours on 2 CPU cores)
#   bash benchmarks/reproduce_queue.sh 3          # only step 3
#
# Then: python benchmarks/reproduce.py report    (docs/results.md + docs/figures/*.png from the committed rows)
#
# A downstream step reads the run's state snapshots (benchmarks/results/reproduce/*_n<N>.pt), local files: on a fresh
# checkout, recreate those of a finished run from its edits alone, checked against its committed rows, by adding
# `--snapshots-only` to its `run` line (e.g. step 3 + " --snapshots-only" before step 11); nothing else is rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T=${THREADS:-1}
R="$PY benchmarks/reproduce.py"
steps=(
  # 1. the paper's ROME: the downstream pass at N = 100 and for the online run (the snapshots must be there)
  "$R downstream --label rome_original --runs stream online --threads $T"
  # 2. the paper's ROME with RECT and RECT + PRUNE (online): the ROME block of the restraint comparison
  "$R run --editor rome --label rome_original --editor-args '{\"key_mode\":\"original\"}' --runs rect_online rect_prune_online --threads $T"
  # 3. the paper's ROME on a second, seeded order
  "$R run --editor rome --label rome_original_seed1 --order seed:1 --editor-args '{\"key_mode\":\"original\"}' --runs stream online --threads $T"
  # 4. r-ROME (the default key choice), the paper's order
  "$R run --editor rome --label rome_averaged --runs stream online --threads $T"
  # 5. MEMIT with the λ chosen by evidence (the SmolLM2 preset, 1500): none / PRUNE / RECT. A PRUNE online run whose
  #    restraint would never act (the finished stream keeps σ_max(ΔW) < τ after every edit) is derived from the
  #    stream, not re-run (rows marked same_weights_as; --no-derive-idle runs it)
  "$R run --editor memit --label memit_l1500 --rect-view --runs stream online rect_online --threads $T"
  # 6. AlphaEdit (its own restraint; the stream without deferred PRUNE views) and PRUNE + AlphaEdit (online)
  "$R run --editor alphaedit --label alphaedit --runs stream online --views none --threads $T"
  # 7-8. the batch-sequential block: batches of 10, where AlphaEdit is strongest
  "$R run --editor memit --label memit_b10 --edit-batch 10 --rect-view --runs stream online rect_online --threads $T"
  "$R run --editor alphaedit --label alphaedit_b10 --edit-batch 10 --runs stream online --views none --threads $T"
  # 9. MEND with the bundled hypernetwork (no retrained one beat it: mend_training.md), with intervals
  "$R run --editor mend --label mend_bundled --runs stream online --threads $T"
  # 10-. the downstream pass (paper counts) for every new row: N = 0, 100, 200 for the main table's rows; N = 0, 200
  # for the rows only the restraint comparison shows (its tables are at N = 200). N = 0 is one pass for all labels, and
  # a view with the same weights as one already evaluated (an idle restraint) takes its rows.
  "$R downstream --label rome_original --runs rect_online rect_prune_online --at 0,200 --threads $T"
  "$R downstream --label rome_original_seed1 --runs stream online --threads $T"
  "$R downstream --label rome_averaged --runs stream online --threads $T"
  "$R downstream --label memit_l1500 --runs stream online --views none deferred_e deferred_1.2 --threads $T && $R downstream --label memit_l1500 --runs stream rect_online --views deferred_rect --at 0,200 --threads $T"
  "$R downstream --label alphaedit --runs stream online --views none --at 0,200 --threads $T"
  "$R downstream --label mend_bundled --runs stream online --threads $T"
  "$R downstream --label memit_b10 --runs stream online rect_online --views none deferred_e deferred_1.2 deferred_rect --at 0,200 --threads $T"
  "$R downstream --label alphaedit_b10 --runs stream online --views none --at 0,200 --threads $T"
  # 18. the summarization interval (bootstrap over examples) for the passes made before it was recorded: the ROME RECT
  #     rows and the batch-of-10 MEMIT rows at N = 200 (their snapshots recreated first, checked against their rows)
  "$R run --editor rome --label rome_original --editor-args '{\"key_mode\":\"original\"}' --runs rect_online rect_prune_online --snapshot-at 200 --snapshots-only --threads $T && $R run --editor memit --label memit_b10 --edit-batch 10 --rect-view --runs stream online --snapshot-at 200 --snapshots-only --threads $T && $R downstream --label rome_original --runs rect_online rect_prune_online --at 200 --tasks summarization --rescore --threads $T && $R downstream --label memit_b10 --runs stream online --views none deferred_e deferred_1.2 deferred_rect --at 200 --tasks summarization --rescore --threads $T"
)
if [[ $# -gt 0 ]]; then
  eval "${steps[$(($1 - 1))]}"
else
  for s in "${steps[@]}"; do eval "$s"; done
fi
