"""report_service: every query from acceptance to deletion.

It records the query (the subject sealed), asks bank_connector for the banks still missing and
records each bank's outcome as it arrives, builds the report when every bank has one, keeps it
encrypted for 7 days and then deletes it, and has the notifier send the "report ready" SMS."""
