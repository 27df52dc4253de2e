"""``import fastdiff`` stays light (no diffusers, triton, scipy, fastapi) and its public submodules load on first
access (``fd.models``, ``fd.ops``, ...).  Run in a fresh interpreter: this test process has imported them all."""

import subprocess
import sys

SCRIPT = r"""
import sys
import fastdiff as fd
heavy = sorted(m for m in ("diffusers", "triton", "scipy", "fastapi", "k_diffusion", "fastdiff.serving",
                           "fastdiff.models", "fastdiff.integrations", "fastdiff.reference") if m in sys.modules)
assert not heavy, f"import fastdiff imported {heavy}"
names = ("reference", "models", "integrations", "serving", "distributed", "ops", "thresholding")
missing = [n for n in names if n not in dir(fd)]
assert not missing, f"not in dir(fastdiff): {missing}"
assert fd.models.GaussianMixture is not None
assert fd.thresholding.threshold_of is fd.ops.threshold_of
for n in names:
    assert getattr(fd, n).__name__ == "fastdiff." + n
assert "diffusers" not in sys.modules  # fd.integrations alone does not import diffusers
assert fd.integrations.k_diffusion.sample_euler is not None
assert "diffusers" in dir(fd.integrations) and "diffusers" not in sys.modules
try:
    fd.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("fd.no_such_name did not raise AttributeError")
print("ok")
"""


def test_import_is_light_and_submodules_load_on_access():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
