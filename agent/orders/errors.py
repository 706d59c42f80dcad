"""The order runner's errors::

    OrderKeyError (Exception)   the order-signing key file is missing or not an Ed25519 key:
                                a configuration error, the daemon does not start
    Refused (Exception)         the node will not run this order; the message says why (it is
                                reported as ``failed`` with ``refused: <why>``)

Errors of libvirt (:class:`agent.host.hypervisor.HypervisorError`), of images
(:class:`agent.host.images.ImageError`) and of domain specs end an order as failed too, except
a ``HypervisorError`` with libvirt gone: the order stays accepted and is finished once libvirt
is back.
"""

from __future__ import annotations


class OrderKeyError(Exception):
    """The order-signing key file is missing or not an Ed25519 public key."""


class Refused(Exception):
    """The node will not run this order; the message says why."""
