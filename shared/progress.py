"""Progress bars with an ETA (tqdm) for the commands that take more than a few seconds.

Why here: ``join``'s fine-tuning (``shared/transfer.py``), ``simulate``'s rounds and the lab's
benchmark all report progress the same way. Bars go to stderr, so a command's stdout (tables,
JSON) stays clean; they are drawn only when the caller asks (the commands do, the library and
the tests' in-process calls stay quiet unless they ask).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def bar(total: int, desc: str, unit: str = "step", enabled: bool = True) -> Any:
    """A tqdm bar on stderr showing done/total, rate and ETA; a no-op bar unless ``enabled``."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                mininterval=0.5, dynamic_ncols=True, leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}s "
                           "[{elapsed}<{remaining} ETA, {rate_fmt}]")
