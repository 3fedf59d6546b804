"""notifier: every SMS the service sends (verification codes, "report ready", consent receipts).

Each message is recorded durably under its idempotency key before anything is sent, so a
retried request never makes a second SMS; a delivery worker then hands it to the provider
(sandbox inbox, console or an SMS vendor's webhook) at least once, retrying with backoff while
the provider fails. Only the sandbox inbox keeps message bodies in clear."""
