# Sourced by the lent-machine scripts here (from the repository root): joins the TVM wheel's halves (the first
# sent ahead to /root/stash, the second carried in .whl/b: DEVELOPERS.md) and installs the carried wheels into
# $SITE once per machine.
SITE=/tmp/site
if [ ! -d "$SITE/tvm" ]; then
  cat /root/stash/tvm.part.aa .whl/b/tvm.part.ab > /tmp/apache_tvm-0.27.0.post1-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
  pip install -q --no-index --no-deps --target "$SITE" /tmp/apache_tvm-*.whl .whl/b/apache_tvm_ffi-*.whl \
      .whl/b/tornado-*.whl .whl/b/xgboost_cpu-*.whl 2>&1 | tail -3
fi
