#!/usr/bin/env bash
# ./run.sh                         demo competition, whole pipeline, CPU, a few minutes
# ./run.sh test [pytest args]      the test suite
# ./run.sh CONFIG [key=value ...]  a real run, e.g. ./run.sh configs/utkface_cpu.yaml data.root=../shared/data/utkface
# ./run.sh app BUNDLE [--port N]   the web page: drop photos, see each face's age and gender (127.0.0.1)
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,5p' "$0"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.installed-requirements; then
  echo "installing requirements into .venv ..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  cp requirements.txt .venv/.installed-requirements
fi
if [ ! -x .venv/bin/agegender ]; then  # this checkout, editable: the agegender command runs it
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . > .venv/editable.log 2>&1 || { cat .venv/editable.log >&2; exit 1; }
fi

case "${1:-}" in
  "")
    .venv/bin/agegender run demo
    ;;
  test)
    shift
    # Debian packages the tests need: Chromium and its driver (tests/test_app.py drives the page; never a browser
    # that downloads itself), a C++ compiler and the Python headers (train.compile's test builds inductor kernels)
    need=()
    [ -x /usr/bin/chromedriver ] || need+=(chromium chromium-driver)
    command -v g++ > /dev/null || need+=(g++)
    inc=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$inc/Python.h" ] || need+=(python3-dev)
    if [ ${#need[@]} -gt 0 ]; then
      if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "installing ${need[*]} (apt-get) ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > /dev/null
      else
        echo "warning: the tests need ${need[*]}: sudo apt-get install ${need[*]}" >&2
      fi
    fi
    # tests/test_kaggle_export.py installs the offline predictor from wheels in a fresh venv: fetched once, here
    if ! cmp -s pipeline/exporting/kaggle-requirements.txt .venv/kaggle-wheels/kaggle-requirements.txt; then
      .venv/bin/python -m pipeline.exporting.kaggle_export wheels .venv/kaggle-wheels
      cp pipeline/exporting/kaggle-requirements.txt .venv/kaggle-wheels/
    fi
    .venv/bin/python -m pytest "$@"
    ;;
  app)
    shift
    .venv/bin/agegender app "$@"
    ;;
  *)
    .venv/bin/agegender run "$@"
    ;;
esac
