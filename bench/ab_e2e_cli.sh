#!/usr/bin/env bash
# End-to-end A/B of two checkouts through the CLI: the same 1.1B TIES merge (fp16, 2 models,
# density 0.2), alternating, 3 rounds each, page cache warm (inputs read once first).
#   python -m fastmerge.testing --preset 1b --out /tmp/lead/fam1b
#   git worktree add /tmp/oldfm <commit> && (cd /tmp/oldfm && python setup.py build_ext --inplace)
#   bash bench/ab_e2e_cli.sh            # OLD=/tmp/oldfm NEW=<this checkout> FAM=...
set -eu
FAM=${FAM:-/tmp/lead/fam1b}
OLD=${OLD:-/tmp/oldfm}
NEW=${NEW:-$(cd "$(dirname "$0")/.." && pwd)}
cat > /tmp/lead/ab.yml <<YML
merge_method: ties
base_model: $FAM/base
models:
  - model: $FAM/ct
    parameters: {weight: 1.0, density: 0.2}
  - model: $FAM/sft
    parameters: {weight: 1.0, density: 0.2}
dtype: float16
YML
cat $FAM/*/*.safetensors > /dev/null
for r in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then P=$OLD; else P=$NEW; fi
    rm -rf /tmp/lead/ab_out_$side
    t0=$(date +%s.%N)
    (cd $P && PYTHONPATH=$P python -m fastmerge.cli merge /tmp/lead/ab.yml /tmp/lead/ab_out_$side --no-progress > /dev/null)
    t1=$(date +%s.%N)
    echo "$side round $r: $(echo "$t1 - $t0" | bc) s"
  done
done
