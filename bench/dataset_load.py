"""How fast bank_sim loads a big dataset and how much memory it keeps: a `python -m bank_sim
--dataset FILE` process from start until SERVING, with its peak and resident memory, beside the
same process holding a single generated person (the interpreter, gRPC and tracing alone).

    python -m bench dataset_load [--cards=1000000]

The file is synthetic (valid Luhn numbers and ID numbers, a few cards a person) and is kept
under var/bench/ for the next run. Target: one million cards SERVING in under 30 s."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bank_sim.process import ROOT, Child, clean_env, free_port
from cardcheck.banks import BANK_CODES
from cardcheck.numbers import id_check_digit, luhn_check_digit

_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = "伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波宇浩芳娜敏静丽艳娟霞燕玲"
_STATUSES = ("ACTIVE",) * 8 + ("DORMANT", "FROZEN", "CLOSED")


def write_cards(path: Path, cards: int) -> None:
    """`cards` valid cards, about three a person, streamed to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    written = person = 0
    with partial.open("w", encoding="utf-8") as out:
        while written < cards:
            person += 1
            first17 = f"110105{1950 + person % 50}{1 + person % 12:02d}{1 + person % 28:02d}{person % 1000:03d}"
            id_number = first17 + id_check_digit(first17)
            name = _SURNAMES[person % len(_SURNAMES)] + _GIVEN[(person // 7) % len(_GIVEN)] + _GIVEN[person % len(_GIVEN)]
            phone = f"13{person % 10}{person:08d}"[-11:]
            for k in range(1 + person % 5):
                if written == cards:
                    break
                bank = BANK_CODES[(person + k * 7) % len(BANK_CODES)]
                body = f"62{(person * 5 + k) % 10000:04d}{written:012d}"
                line = {
                    "bank": bank, "pan": body + luhn_check_digit(body), "card_type": "DEBIT" if k % 2 else "CREDIT",
                    "holder_name": name, "id_number": id_number,
                    "id_expiry": None if person % 3 else f"20{30 + person % 20}-0{1 + k}-15",
                    "reserved_phone": None if (person + k) % 11 == 0 else phone,
                    "cnp_enabled": (person + k) % 13 != 0, "status": _STATUSES[(person + k) % len(_STATUSES)],
                    "opened_on": f"20{10 + k}-0{1 + person % 9}-1{person % 10}",
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
    partial.rename(path)


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def serve_once(work: Path, args: list[str]) -> tuple[float, float, float]:
    """Seconds from start until SERVING, resident MB, peak MB."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    child = Child("bank_sim", args, clean_env(work, CARDCHECK_BANK_SIM_ADDR=address), address, work / f"sim-{port}.log")
    try:
        child.wait_serving(timeout=300)
        seconds = time.monotonic() - started
        rss, peak = memory_mb(child.process.pid)
    finally:
        child.stop()
    return seconds, rss, peak


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench dataset_load")
    parser.add_argument("--cards", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    work = ROOT / "var" / "bench"
    path = work / f"cards-{args.cards}.jsonl"
    if not path.exists():
        started = time.monotonic()
        write_cards(path, args.cards)
        print(f"wrote {args.cards} cards to {path} in {time.monotonic() - started:.1f} s", flush=True)
    base_s, base_rss, base_peak = serve_once(work, ["--seed", "1", "--people", "1"])
    load_s, rss, peak = serve_once(work, ["--dataset", str(path)])
    size_mb = path.stat().st_size / 1e6
    print(f"\n{'bank_sim process':<34}{'to SERVING s':>14}{'RSS MB':>10}{'peak MB':>10}")
    print(f"{'one generated person (baseline)':<34}{base_s:>14.1f}{base_rss:>10.0f}{base_peak:>10.0f}")
    print(f"{f'{args.cards:,} cards ({size_mb:.0f} MB file)':<34}{load_s:>14.1f}{rss:>10.0f}{peak:>10.0f}")
    per_card = (rss - base_rss) * 1024 * 1024 / args.cards
    target = 30 * args.cards / 1_000_000
    verdict = "met" if load_s - base_s < target else "MISSED"
    print(f"\nload {load_s - base_s:.1f} s over the baseline (target < {target:.0f} s: {verdict}); "
          f"{per_card:.0f} bytes a card held; {args.cards / max(load_s - base_s, 1e-9):,.0f} cards/s")
    return 0
