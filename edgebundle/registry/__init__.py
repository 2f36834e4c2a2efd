"""Pulling from OCI registries: credentials, token auth, manifests and blobs (packer only)."""

from .auth import Credential, CredentialStore, docker_config_path, parse_www_authenticate
from .client import Endpoint, RegistryClient

__all__ = [
    "Credential",
    "CredentialStore",
    "Endpoint",
    "RegistryClient",
    "docker_config_path",
    "parse_www_authenticate",
]
