#!/usr/bin/env bash
# Run the shipped recipes whose source is an artifact on two checkouts and compare their reports.
#   git worktree add /tmp/base baa1149
#   benchmarks/compare_recipes.sh /tmp/base .        # old checkout, new checkout
# Each side runs with its own DQNC_CACHE and out_dir under /tmp/rc-*; the output lists, per recipe,
# both exit codes and every report figure that differs (benchmarks/compare_reports.py).
set -u
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd)
py=${PYTHON:-$new/.venv/bin/python}
for name in cartpole cartpole-tiny cartpole-pruned cartpole-2by4 cartpole-units cartpole-auto; do
  for side in old new; do
    root=$old; [ $side = new ] && root=$new
    d=/tmp/rc-$side-$name; rm -rf "$d"; mkdir -p "$d"
    sed "s#\.\./sample_models#$root/sample_models#; s#^out_dir: .*#out_dir: $d/out#" "$root/recipes/$name.yaml" > "$d/r.yaml"
    (cd "$d" && DQNC_CACHE=$d/cache PYTHONPATH=$root "$py" -m dqnc run "$d/r.yaml" > "$d/log" 2>&1; echo "rc $?" >> "$d/log")
  done
  echo "== $name: old $(tail -1 /tmp/rc-old-$name/log), new $(tail -1 /tmp/rc-new-$name/log)"
  "$py" "$new/benchmarks/compare_reports.py" /tmp/rc-old-$name/out/report.json /tmp/rc-new-$name/out/report.json
done
