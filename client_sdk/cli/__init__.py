"""Command-line tools built on the SDK: `pns-client` (the reference backup client) and
`pns-device` (a phone simulator, the reference for mobile developers)."""
