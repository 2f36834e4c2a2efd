"""Moving reports and bundles between the packer and devices.

``transfer.ssh`` pulls a device's inventory report over SSH (paramiko);
``transfer.upload.upload_bundle`` sends a bundle to a device's staging directory,
resumably and verified (what ``sync`` builds on). ``pull_report`` is imported
lazily here so that ``import edgebundle.transfer`` does not load paramiko: only
the modules that talk SSH depend on it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pull_report"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: `from edgebundle.transfer import pull_report` still works.
    if name == "pull_report":
        from .ssh import pull_report

        return pull_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
