# Sourced by the device scripts (launch/ab_decode.sh, launch/gpu_kernel_checks.sh,
# launch/smollm2_gpu.sh): the wheels a device call carries in .whl/ (ml-collections, gguf,
# accelerate: what the device's Python lacks) go into /tmp/site, which the scripts put on
# PYTHONPATH. --target keeps them out of the device's own site-packages, so its preinstalled
# packages stay as they are.
install_carried_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  fi
}
