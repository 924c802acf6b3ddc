#!/usr/bin/env bash
# The notebook lanes of .ci/run, against the installed wheel rather than this checkout:
#   tests/lanes/run.sh kaggle   Python 3.12 with Kaggle's image (kaggle-image.txt) installed first; the wheel
#                               pip-installed into it (nothing it held may change); then tests/lanes: the demo with
#                               face_crop=detect, export, predict-images, the offline Kaggle predictor, the notebook
#   tests/lanes/run.sh colab    Python 3.13 smoke: install, then the demo with face_crop=detect
set -euo pipefail
# pip's lines about this machine's missing extra index, dropped; a pip failure still fails the lane (pipefail)
drop_index_warnings() { grep -v "^WARNING: Location" || true; }
cd "$(dirname "$0")/../.."
lane=${1:?usage: tests/lanes/run.sh kaggle|colab}
case $lane in
  kaggle) version=3.12 extras="train,serve,export" ;;
  colab) version=3.13 extras="train" ;;
  *) echo "unknown lane $lane (kaggle|colab)" >&2; exit 2 ;;
esac
python=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$version.*/bin/python$version 2>/dev/null | sort -V | tail -1)
[ -x "$python" ] || { echo "no Python $version under pyenv (pyenv install $version)" >&2; exit 2; }
venv=.venv-$lane
image=tests/lanes/$lane-image.txt
start=$SECONDS

# the notebook's own stack, installed once (rebuilt when the image file changes)
if ! cmp -s "$image" "$venv/.image"; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | drop_index_warnings
  "$venv/bin/python" -m pip install -q -r "$image" 2>&1 | drop_index_warnings
  "$venv/bin/python" -m pip freeze --all | sort > "$venv/freeze-image.txt"  # what the notebook holds
  cp "$image" "$venv/.image"
fi
echo "lane $lane: $("$venv/bin/python" -V), the notebook's stack ready after $((SECONDS - start)) s"

# the wheel, built from this checkout, installed as a notebook would: nothing it already holds may change
rm -rf dist build && "$venv/bin/python" -m pip wheel -q --no-deps -w dist . 2>&1 | drop_index_warnings
wheel=$(ls dist/agegender-*.whl)
"$venv/bin/python" -m pip uninstall -q -y agegender 2>/dev/null || true
t=$SECONDS
"$venv/bin/python" -m pip install -q "$wheel[$extras]" 2>&1 | drop_index_warnings
echo "lane $lane: pip install $(basename "$wheel")[$extras] took $((SECONDS - t)) s"
"$venv/bin/python" -m pip freeze --all | grep -v "^agegender" | sort > "$venv/freeze-after.txt"
changed=$(comm -23 "$venv/freeze-image.txt" "$venv/freeze-after.txt")
if [ -n "$changed" ]; then
  echo "lane $lane: pip install replaced what the notebook had:" >&2
  echo "$changed" >&2
  exit 1
fi
echo "lane $lane: nothing the notebook held changed; added: $(comm -13 "$venv/freeze-image.txt" "$venv/freeze-after.txt" | tr '\n' ' ')"

if [ "$lane" = colab ]; then
  work=$(mktemp -d)
  (cd "$work" && echo 'raise SystemExit("shadowed")' > pipeline.py &&
    PATH="$PWD/../$venv/bin:$PATH" WANDB_MODE=disabled "$OLDPWD/$venv/bin/agegender" run demo data.face_crop=detect \
      > run.log 2>&1) || { tail -30 "$work/run.log" >&2; exit 1; }
  grep -E "^(CV score|submission|run finished)" "$work/run.log"
  rm -rf "$work"
else
  wheels=$venv/kaggle-wheels  # export --format kaggle's wheels for Kaggle's Python, fetched once
  if ! cmp -s pipeline/exporting/kaggle-requirements.txt "$wheels/kaggle-requirements.txt"; then
    rm -rf "$wheels" && mkdir -p "$wheels"
    "$venv/bin/python" -m pipeline.exporting.kaggle_export wheels "$wheels" "$version"
    cp pipeline/exporting/kaggle-requirements.txt "$wheels/"
  fi
  AGEGENDER_LANE=kaggle AGEGENDER_WHEEL=$PWD/$wheel AGEGENDER_KAGGLE_WHEELS=$PWD/$wheels \
    "$venv/bin/pytest" -q -p no:cacheprovider tests/lanes
fi
echo "lane $lane: passed in $((SECONDS - start)) s"
