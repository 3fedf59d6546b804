"""`cardcheck up`, `cardcheck demo`, `cardcheck load`, `cardcheck dataset`, `cardcheck audit`,
`cardcheck keys`, `cardcheck certs` and `cardcheck config`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardcheck", description="One-click bank card check, locally.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start all five services on loopback until Ctrl-C")
    up.add_argument("--dataset", type=Path, help="bank dataset (cardcheck-bank-dataset/1 JSON Lines)")
    up.add_argument("--data-dir", type=Path, help="overrides CARDCHECK_DATA_DIR (default ./var)")
    up.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for SERVING")
    up.add_argument("--bank-latency-ms", type=float, help="a fixed latency on every simulated bank")
    up.add_argument("--bank-profile", type=Path, help="per-bank behaviour for bank_sim (JSON)")
    up.add_argument("--load-test", action="store_true",
                    help="sandbox only: raise the limits that stop one machine driving `cardcheck load`")
    up.add_argument("--tls", action="store_true",
                    help="the whole mesh on mutual TLS, with the development certificates (made when missing)")

    demo = commands.add_parser("demo", help="run the whole user journey against a running mesh")
    demo.add_argument("--dataset", type=Path, help="the dataset bank_sim serves (default: the generated one)")
    demo.add_argument("--payment-password", default="135790")

    load = commands.add_parser(
        "load", help="load test the whole journey at an open-loop rate (`cardcheck load --help`)", add_help=False
    )
    load.add_argument("args", nargs=argparse.REMAINDER)

    audit = commands.add_parser(
        "audit", help="the audit trail: `cardcheck audit verify` checks its hash chain (`rekey`: once, to key it)", add_help=False
    )
    audit.add_argument("args", nargs=argparse.REMAINDER)

    keys = commands.add_parser("keys", help="rotate the embedded default's master key, then rewrap")
    keys.add_argument("action", choices=["rotate", "rewrap"],
                      help="rotate: a new master key, the old one retired; rewrap: every service's data under the new one")
    keys.add_argument("--data-dir", type=Path, help="overrides CARDCHECK_DATA_DIR (default ./var)")

    certs = commands.add_parser("certs", help="write a development CA and each service's certificate and key")
    certs.add_argument("--data-dir", type=Path, help="overrides CARDCHECK_DATA_DIR (default ./var); they go in tls/")
    certs.add_argument("--renew", action="store_true", help="issue every certificate again (the CAs are kept)")

    from cardcheck.cli import config

    config.add_parser(commands)

    dataset = commands.add_parser("dataset", help="write a synthetic bank dataset")
    dataset.add_argument("--seed", type=int)
    dataset.add_argument("--people", type=int)
    dataset.add_argument("-o", "--output", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit"]:  # report_service's own command line, options and help included
        from report_service.audit import main as audit_main

        sys.exit(audit_main(argv[1:]))
    if argv[:1] == ["load"]:  # its own parser: a bad argument is one line and exit code 2
        from cardcheck.load.run import main as load_main

        sys.exit(load_main(argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "up":
        from cardcheck.cli.up import run_up

        bank_env = {}
        if args.bank_latency_ms is not None:
            bank_env["CARDCHECK_BANK_LATENCY_MS"] = f"{args.bank_latency_ms:g}"
        if args.bank_profile is not None:
            bank_env["CARDCHECK_BANK_PROFILE"] = str(args.bank_profile.resolve())
        if args.tls:
            bank_env["CARDCHECK_TLS"] = "on"
        sys.exit(asyncio.run(run_up(args.dataset, args.data_dir, args.ready_timeout, bank_env, args.load_test)))
    if args.command == "demo":
        from cardcheck.cli.demo import run_demo

        sys.exit(asyncio.run(run_demo(args.dataset, args.payment_password)))
    if args.command == "keys":
        from cardcheck.cli.keys import rewrap_all, rotate

        sys.exit(rotate(args.data_dir) if args.action == "rotate" else rewrap_all(args.data_dir))
    if args.command == "certs":
        from cardcheck.cli.certs import run as run_certs

        sys.exit(run_certs(args.data_dir, args.renew))
    if args.command == "config":
        from cardcheck.cli.config import run

        sys.exit(run(args))
    if args.command == "dataset":
        from cardcheck import dataset

        seed = dataset.DEFAULT_SEED if args.seed is None else args.seed
        people = dataset.DEFAULT_PEOPLE if args.people is None else args.people
        records = dataset.generate(seed, people)
        dataset.dump(records, args.output)
        print(f"wrote {len(records)} cards of {people} people (seed {seed}) to {args.output}")


if __name__ == "__main__":
    main()
