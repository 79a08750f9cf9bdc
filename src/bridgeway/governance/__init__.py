"""Governance: what the gateway owes its operators beyond routing traffic (audit; later policy,
secrets and provenance)."""
