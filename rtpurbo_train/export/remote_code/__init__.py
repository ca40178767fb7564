"""The modeling code copied into every export folder (loaded there by transformers with
`trust_remote_code=True`; importable here for tests)."""
