"""What the console must show of a run: each epoch's line once, and none of Ray Train's per-report dumps.

Import from a test module: `from console_lines import assert_console_once` (tests/ is on sys.path under pytest's
default import mode).
"""
from __future__ import annotations

import re


def epoch_lines(text: str, epoch: int) -> list[str]:
    """The run's per-epoch summary lines for `epoch` (Ray prefixes a worker's lines with its name and pid)."""
    return re.findall(rf"^.*epoch +{epoch} \| loss .*$", text, flags=re.MULTILINE)


def assert_console_once(text: str, epochs: int) -> None:
    """Each epoch's line exactly once, and none of Ray Train's per-report dumps."""
    for epoch in range(1, epochs + 1):
        assert len(epoch_lines(text, epoch)) == 1, f"epoch {epoch}:\n{text[-4000:]}"
    assert "TrainingReport(" not in text, text[-4000:]
