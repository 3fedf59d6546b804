"""The public edge (`cardcheck.v1.CardCheck`): registration with a real-name checked card, SMS
challenges, sessions, consent and the query flow, in front of report_service, bank_connector and
the notifier."""
