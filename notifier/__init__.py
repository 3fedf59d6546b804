"""notifier: every SMS the service sends (verification codes, "report ready", consent receipts).

Each message is recorded before it is delivered, so a retried request never sends a second SMS.
In sandbox mode (the default) delivery only marks the message delivered and the table is the
inbox that tests and developers read through ListMessages; outside sandbox no body is kept."""
