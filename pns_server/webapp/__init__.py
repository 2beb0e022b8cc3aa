"""The web approver: an installable web app served at /app/, and its Web Push key."""
