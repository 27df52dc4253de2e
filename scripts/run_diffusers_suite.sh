#!/usr/bin/env bash
# diffusers' own scheduler tests, run once on diffusers' schedulers (stock) and once with fastdiff's drop-ins
# patched in before the test modules import them (scripts/diffusers_suite_conftest.py); prints pass / fail per file
# side by side and the tests that pass on stock but fail with the drop-ins.
#
#   scripts/run_diffusers_suite.sh DIFFUSERS_CHECKOUT [pytest args...]
#
# DIFFUSERS_CHECKOUT: a diffusers source tree (its tests/ folder: tests/__init__.py, tests/testing_utils.py,
# tests/schedulers/) matching the installed diffusers version.
set -euo pipefail
if [[ $# -lt 1 || ! -d "$1/tests/schedulers" ]]; then
    echo "usage: $0 DIFFUSERS_CHECKOUT [pytest args...]  (a diffusers source tree with tests/schedulers)" >&2
    exit 2
fi
CHECKOUT=$(cd "$1" && pwd)
shift
HERE=$(cd "$(dirname "$0")" && pwd)
FILES=()
for f in ddim ddpm dpm_multi dpm_single euler euler_ancestral heun lcm unipc flow_match_euler_discrete \
         lms kdpm2_discrete kdpm2_ancestral deis ipndm sasolver tcd dpm_sde pndm edm_euler edm_dpmsolver_multistep; do
    [[ -f "$CHECKOUT/tests/schedulers/test_scheduler_$f.py" ]] && FILES+=("tests/schedulers/test_scheduler_$f.py")
done
OUT=$(mktemp -d)
cd "$CHECKOUT"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q -p no:cacheprovider -W ignore "${FILES[@]}" --junitxml="$OUT/stock.xml" "$@" >"$OUT/stock.log" 2>&1 || true
python -m pytest -q -p no:cacheprovider -W ignore -p diffusers_suite_conftest "${FILES[@]}" \
    --junitxml="$OUT/dropin.xml" "$@" >"$OUT/dropin.log" 2>&1 || true
python - "$OUT/stock.xml" "$OUT/dropin.xml" <<'PY'
import collections, sys, xml.etree.ElementTree as ET

def outcomes(path):
    res = {}
    for case in ET.parse(path).iter("testcase"):
        name = case.get("classname", "") + "::" + case.get("name", "")
        kinds = {child.tag for child in case}
        res[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed",
                     next((c.get("message", "") for c in case if c.tag in ("failure", "error")), ""))
    return res

stock, dropin = outcomes(sys.argv[1]), outcomes(sys.argv[2])
per_file = collections.defaultdict(lambda: [0, 0, 0, 0])
for name, (o, _) in stock.items():
    f = name.split("::")[0].rsplit(".", 1)[0]
    per_file[f][0] += o == "passed"
    per_file[f][1] += o != "skipped"
    per_file[f][2] += dropin.get(name, ("missing",))[0] == "passed"
    per_file[f][3] += dropin.get(name, ("missing",))[0] != "skipped"
print(f"{'test module':58s} {'stock':>11s} {'drop-in':>11s}")
tot = [0, 0, 0, 0]
for f, c in sorted(per_file.items()):
    print(f"{f:58s} {c[0]:4d} / {c[1]:4d} {c[2]:4d} / {c[3]:4d}")
    tot = [a + b for a, b in zip(tot, c)]
print(f"{'total (passed / run)':58s} {tot[0]:4d} / {tot[1]:4d} {tot[2]:4d} / {tot[3]:4d}")
both = [n for n, (o, _) in stock.items() if o == "passed"]
lost = [n for n in both if dropin.get(n, ("missing",))[0] != "passed"]
print(f"\nof the {len(both)} tests that pass on stock diffusers, {len(both) - len(lost)} pass with fastdiff's drop-ins")
for n in lost:
    message = dropin.get(n, ("missing", ""))[1].strip().splitlines() or [""]
    print(f"  FAIL {n}: {message[0][:200]}")
PY
echo "logs: $OUT"
