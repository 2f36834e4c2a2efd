"""How the packer reaches devices over SSH: the flags of `inventory pull` and `sync` as one value.

Apart from ``transfer.ssh`` so that parsing arguments does not import paramiko.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_TIMEOUT = 15.0  # connect, banner and auth: a device on a slow cellular link


@dataclass(frozen=True)
class SshOptions:
    """How to reach devices, as the packer's SSH flags say (one value for every caller).

    Attributes:
        ssh_config_path: ssh config to apply; ``None`` uses ~/.ssh/config when present.
        known_hosts: The only known_hosts file to trust (and to add new keys to).
            ``None``: the config's UserKnownHostsFile or ~/.ssh/known_hosts, plus
            /etc/ssh/ssh_known_hosts (read only).
        allow_unknown_host: Accept a host key that known_hosts lacks and save it
            (OpenSSH's ``StrictHostKeyChecking=accept-new``). A changed key is
            refused regardless.
        key_filename: Private key to authenticate with (default: the config's
            IdentityFile, the ssh agent and the usual ~/.ssh/id_* keys).
        timeout: Seconds allowed for connecting, the SSH banner and authentication.
    """

    ssh_config_path: Optional[str] = None
    known_hosts: Optional[str] = None
    allow_unknown_host: bool = False
    key_filename: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT
