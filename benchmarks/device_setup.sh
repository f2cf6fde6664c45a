# Sourced first by every GPU session script (benchmarks/*session.sh) on a lent machine: installs the
# carried .whl/ wheels the image lacks (../shared/device/wheels.sh), puts them and this checkout on
# PYTHONPATH, names the folder that comes back ($out) and prints the GPUs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
