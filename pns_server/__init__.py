"""PNS relay: push approvals and one-time passwords for backup-client logins."""

__version__ = "0.1.0"
