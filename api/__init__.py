"""The REST API and (later) the portal."""
