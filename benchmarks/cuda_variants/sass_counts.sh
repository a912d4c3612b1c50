#!/usr/bin/env bash
# Static SASS instruction counts and registers of every kernel in
# quant_variants.cu, for sm_90: a GPU-free first look at a candidate (each
# thread of the quantize kernels handles 32 values, so count / 32 is an upper
# bound on instructions per value: the count includes tail and slow paths).
# Needs nvcc and cuobjdump; CUDA 13's pip wheel has the latter:
#   pip install nvidia-cuda-cuobjdump   (bin/ under site-packages/nvidia/cu13)
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "cuobjdump"))' \
    2>/dev/null || true)
fi
if [ ! -x "$NVCC" ] || [ -z "$CUOBJDUMP" ] || [ ! -x "$CUOBJDUMP" ]; then
  echo "sass_counts: needs nvcc ($NVCC) and cuobjdump (set CUOBJDUMP, or pip install nvidia-cuda-cuobjdump)" >&2
  exit 1
fi
cubin=$(mktemp --suffix .cubin)
trap 'rm -f "$cubin"' EXIT
"$NVCC" -O3 -std=c++17 -arch=sm_90 --fmad=false -I csrc/include -cubin \
  benchmarks/cuda_variants/quant_variants.cu -o "$cubin"
declare -A regs
while read -r name r; do regs[$name]=$r; done < <("$CUOBJDUMP" -res-usage "$cubin" 2>/dev/null |
  awk '/Function/{sub(":", "", $2); name=$2} /REG:/{match($0, /REG:[0-9]+/); print name, substr($0, RSTART + 4, RLENGTH - 4)}')
printf '%-10s %4s %12s %9s\n' kernel bits instructions registers
"$CUOBJDUMP" -sass "$cubin" | awk '/Function :/{name=$3} /\/\*[0-9a-f]+\*\/ +[A-Z@]/{c[name]++} END{for (k in c) print k, c[k]}' |
  sort | while read -r name count; do
    # _Z7q_lanesILi4EEv... -> q_lanes 4
    kernel=$(sed -E 's/^_Z[0-9]+([a-z_]+)ILi([0-9]+)E.*/\1/' <<<"$name")
    bits=$(sed -E 's/^_Z[0-9]+([a-z_]+)ILi([0-9]+)E.*/\2/' <<<"$name")
    printf '%-10s %4s %12s %9s\n' "$kernel" "$bits" "$count" "${regs[$name]:-?}"
  done
