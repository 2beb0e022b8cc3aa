"""clients domain."""
