"""pytest plugin: diffusers' own scheduler tests run against fastdiff's drop-in schedulers.

Loaded with ``-p diffusers_suite_conftest`` (``scripts/`` on ``PYTHONPATH``) by ``scripts/run_diffusers_suite.sh``.
At configure time, before any test module is imported, every scheduler class that
``fastdiff.integrations.diffusers`` replaces is patched into ``diffusers.<Name>``, ``diffusers.schedulers.<Name>``
and its defining module ``diffusers.schedulers.scheduling_*.<Name>``, so ``from diffusers import DDIMScheduler`` in a
test module gets fastdiff's class.
"""

from __future__ import annotations

import sys


def pytest_configure(config):
    import diffusers
    import diffusers.schedulers

    import fastdiff.integrations.diffusers as fdd

    patched = []
    for name in fdd.__all__:
        ours = getattr(fdd, name)
        stock = getattr(diffusers, name, None)
        if not isinstance(ours, type) or stock is None or stock is ours:
            continue
        module = sys.modules[stock.__module__]
        for holder in (diffusers, diffusers.schedulers, module):
            setattr(holder, name, ours)
        patched.append(name)
    config._fastdiff_patched = patched


def pytest_report_header(config):
    return "fastdiff drop-ins patched into diffusers: " + ", ".join(getattr(config, "_fastdiff_patched", []))
