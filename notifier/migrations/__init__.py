"""The notifier's schema, one hand-written revision per module in versions/, applied at start by
cardcheck.runtime.migrations.upgrade_to_head (version table alembic_version_notifier)."""
