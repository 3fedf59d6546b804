"""The small runtime every service shares: settings, server bootstrap, channels, telemetry,
errors, database, keys and the clock. Services import this and the generated stubs only."""
