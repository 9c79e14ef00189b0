"""Progress bars on stderr: live on a terminal, a line every 30 s in logs (CI, Ray, schedulers)."""

from __future__ import annotations

import sys

from tqdm import tqdm

_SHOWN = {"bars": True}  # False after `wysiwyc -q` (this process's bars)


def set_enabled(flag: bool) -> None:
    """Show (True) or hide (False) every progress bar this process makes from now on."""
    _SHOWN["bars"] = bool(flag)


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr that does not flood non-interactive logs."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not (enabled and _SHOWN["bars"]),
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 30.0,
        maxinterval=60.0 if not interactive else 10.0,
    )
