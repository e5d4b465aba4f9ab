#!/usr/bin/env bash
# The accelerator checks of issue 16 in one command, on a GPU machine with this repository:
#
#     bash benchmarks/accelerator.sh            # writes accelerator_results/ (tables and JSON lines)
#
# Installs the CUDA build of JAX (skipped when JAX already sees a GPU), then runs:
#  1. the flash/dense equality and leakage tests on the GPU's own kernels (tokamax Mosaic GPU / Triton);
#  2. base and large at bfloat16, sequence 512 and 2048, for mlm, clm, unilm and the four-way mixture,
#     dense against flash: step time, tokens/s, MFU against the H200's bfloat16 dense peak (989.4 TFLOP/s,
#     pretrain.metrics.KNOWN_PEAKS, read from the device kind) and peak device memory;
#  3. the loss head on this backend: plain full logits (the accelerator default) against the weighted
#     head with its hand-derived gradient (the CPU default), at base, 512, mlm and clm.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-accelerator_results}
mkdir -p "$out"
if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  pip install -q -e . "jax[cuda12]"
fi
python -c 'import jax; print(jax.devices())' | tee "$out/devices.txt"
export PRETRAIN_KEEP_FREED_MEMORY=0
# The flash tests assert the kernel that ran (mosaic_gpu or triton on a GPU): a run that fell back to
# tokamax's chunked XLA path fails them, and then this script, before any benchmark.
if ! python -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
  tests/test_objective_contract.py -k "flash or key_ranges" > "$out/tests.txt" 2>&1; then
  tail -20 "$out/tests.txt"
  echo "accelerator.sh: FAILED: the flash tests failed (or ran the chunked XLA fallback instead of the GPU" \
    "kernels); full log in $out/tests.txt" >&2
  exit 1
fi
tail -5 "$out/tests.txt"
mixture="mlm:1,clm:1,mass:1,unilm:1"
for size in base large; do
  python benchmarks/throughput.py --attention=dense,flash --dtype=bfloat16 --sizes=$size --seq_lens=512,2048 \
    --objectives="mlm,clm,unilm,$mixture" --tokens_per_batch=65536 --rounds=3 --steps=5 --batches=2 \
    --workdir="$out/tokenizer" --json 2>&1 | tee "$out/attention_$size.txt"
done
for head in full weighted; do
  python benchmarks/throughput.py --attention=flash --dtype=bfloat16 --sizes=base --seq_lens=512 \
    --objectives=mlm,clm --tokens_per_batch=65536 --rounds=3 --steps=5 --batches=2 --loss_head=$head \
    --workdir="$out/tokenizer" --json 2>&1 | tee "$out/loss_head_$head.txt"
done
