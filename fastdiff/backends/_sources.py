"""Where the kernel sources live, for editable and regular installs alike."""

from __future__ import annotations

import pathlib


def csrc_dir() -> pathlib.Path:
    """The directory holding ``common/``, ``cpu/`` and ``cuda/`` sources."""
    try:
        import fastdiff.csrc as pkg

        return pathlib.Path(pkg.__file__).resolve().parent
    except ImportError:  # running from a source tree without installation
        return pathlib.Path(__file__).resolve().parents[2] / "csrc"
