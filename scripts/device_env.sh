# Sourced by the device scripts: make `import vlmx.<part>` work on the device machine's own Python.
# An editable install where it works; else link vlmx.<part> onto the repo's part directories.
export PYTHONUNBUFFERED=1
# Carried py3.12 wheels (.whl) of packages the device image lacks, installed once per machine into /tmp/site.
WHEELS=${VLMX_WHEELS:-.whl}
if ls $WHEELS/*.whl >/dev/null 2>&1; then
  [ -f /tmp/site/.vlmx-wheels ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site $WHEELS/*.whl && touch /tmp/site/.vlmx-wheels; } || { echo "wheel install failed"; exit 1; }
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
fi
PY=${PYTHON:-python3}
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"${OUT:-/tmp}/pip.txt" 2>&1 \
    || ! $PY -c "import vlmx.plugins" 2>/dev/null; then
  mkdir -p /tmp/vlmx_pkg/vlmx && for part in torch_ref export plugins trt_runtime apps; do
    [ -d "$part" ] && ln -sfn "$PWD/$part" "/tmp/vlmx_pkg/vlmx/$part"; done
  export PYTHONPATH=/tmp/vlmx_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
