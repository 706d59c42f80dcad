"""The hypervisor's errors, without libvirt: the modules beside ``hypervisor.py`` (the one that
imports libvirt and turns its ``libvirtError`` into these) raise and catch them too.

::

    HypervisorError            libvirt refused or failed (code: libvirt's error code)
    └── MigrationTimeoutError  a migration ran past its timeout and was aborted
"""

from __future__ import annotations


class HypervisorError(Exception):
    """libvirt refused or failed; ``code`` is libvirt's error code (0 when unknown)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class MigrationTimeoutError(HypervisorError):
    """A migration ran past its ``timeout_s`` and was aborted; the guest still runs at the
    source. ``code`` is libvirt's for the failed call (usually VIR_ERR_OPERATION_ABORTED)."""

    def __init__(self, message: str, code: int, timeout_s: float) -> None:
        super().__init__(message, code)
        self.timeout_s = timeout_s
