-- One login role and one schema per service that keeps state, in the one database they share.
-- Each service's tables land in the schema named after its role (the default search_path,
-- "$user", public, finds it first), and no role can read or change another's: a gateway that
-- is broken into holds neither the reports nor the SMS log.
--
-- Run once, as a superuser, connected to the database the services will use:
--     psql -d cardcheck -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
-- then give each role a password (\password cardcheck_gateway) and put its URL in that service's
-- Secret: postgresql+psycopg://cardcheck_gateway:PASSWORD@HOST:5432/cardcheck
-- Each service migrates its own schema when it starts.

BEGIN;

-- Nobody else creates in public (already so on PostgreSQL 15 and later).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

CREATE ROLE cardcheck_gateway LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
CREATE SCHEMA cardcheck_gateway AUTHORIZATION cardcheck_gateway;

CREATE ROLE cardcheck_report_service LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
CREATE SCHEMA cardcheck_report_service AUTHORIZATION cardcheck_report_service;

CREATE ROLE cardcheck_notifier LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
CREATE SCHEMA cardcheck_notifier AUTHORIZATION cardcheck_notifier;

COMMIT;
