"""The README's two commands are what CI and users run: keep .ci/run and the CLI in step with them."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_verbatim():
    main_cmd, test_cmd = readme_commands()[:2]
    assert "pytest" in test_cmd and "fastdiff demo" in main_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "the last command of .ci/run must be the README's test command"


def test_demo_runs_quickly(tmp_path, capsys):
    from fastdiff.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "dpmpp_2m" in table and "diffusers" in table and "Frechet" in table
    pngs = sorted(tmp_path.glob("digits_*.png"))
    assert len(pngs) >= 6
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)


def test_ring_demo(tmp_path):
    from fastdiff.cli import main

    assert main(["demo", "--ring", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ring_samples.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_quick_smoke(tmp_path, capsys):
    """`fastdiff bench --quick` runs end to end (no timing assertions; results go to tmp_path)."""
    import json

    from fastdiff.cli import main

    subjects = ["quality", "step_cpu", "step_solvers", "dropin"]
    # (--no-compile: inductor's warm-up would dominate the test; the compile provider runs in `fastdiff bench`)
    assert main(["bench", "--quick", "--no-compile", "--only", *subjects, "--out-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any(k.endswith("quality.json") for k in out)
    dropin = next(v for k, v in out.items() if k.endswith("dropin.json"))
    assert dropin["rows"] and all(r["max_rel_diff"] < 1e-3 for r in dropin["rows"])
    step = next(v for k, v in out.items() if k.endswith("step_solvers.json"))
    # every provider passed its correctness check against fastdiff before it was timed
    providers = {r["provider"] for r in step["rows"]}
    assert {"torch-eager", "diffusers"} <= providers
    assert all(r["refcheck_rel_err"] <= 1e-4 for r in step["rows"])


def test_readme_tour_runs_verbatim(capsys):
    """The README's tour is run as written (its first python block after '## A short tour')."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A short tour"):]
    code = tour[tour.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    exec(compile(code, "README.md tour", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("20 [999. 949. 899.] 0.0"), out
