"""The virt8ra aggregator."""
