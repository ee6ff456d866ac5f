# Sourced by the device scripts: make `import vlmx.<part>` work on the device machine's own Python.
# An editable install where it works; else link vlmx.<part> onto the repo's part directories.
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"${OUT:-/tmp}/pip.txt" 2>&1 \
    || ! $PY -c "import vlmx.plugins" 2>/dev/null; then
  mkdir -p /tmp/vlmx_pkg/vlmx && for part in torch_ref export plugins trt_runtime; do
    [ -d "$part" ] && ln -sfn "$PWD/$part" "/tmp/vlmx_pkg/vlmx/$part"; done
  export PYTHONPATH=/tmp/vlmx_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
