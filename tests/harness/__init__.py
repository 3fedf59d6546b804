"""What the tests share: waiting for a condition, service processes, fakes of the
services, the gateway and report_service set-ups, and `cardcheck up` as a mesh of processes."""
