"""The `lomo` command line (and, later, a typed REST client)."""
