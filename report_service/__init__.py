"""report_service: every query from acceptance to deletion.

It accepts a query together with the work of running it, in one transaction (the subject
sealed); a worker holding the work's lease asks bank_connector for the banks still missing and
records each outcome as it arrives; banks that failed are asked again in later passes until
ready_by (24 h after submission); the report is built when every bank has answered, or at
ready_by with the others unavailable; it is kept encrypted under a data key of its own for 7 days
of 24 h (configurable) and then destroyed; the notifier is made to accept exactly one "report
ready" SMS. Every event goes to a hash-chained audit trail (`python -m report_service.audit
verify`). The schema is migrated at start (report_service/migrations); see
report_service/config.py for its settings."""
