"""The 24 banks the service can ask (docs/api.md's bank codes)."""

from __future__ import annotations

from dataclasses import dataclass

from cardcheck.v1 import common_pb2


@dataclass(frozen=True)
class BankInfo:
    code: str
    name: str
    kind: common_pb2.BankKind.ValueType


_NATIONAL = [
    ("ICBC", "中国工商银行"), ("ABC", "中国农业银行"), ("BOC", "中国银行"), ("CCB", "中国建设银行"),
    ("COMM", "交通银行"), ("PSBC", "中国邮政储蓄银行"), ("CITIC", "中信银行"), ("CEB", "中国光大银行"),
    ("CMB", "招商银行"), ("SPDB", "上海浦东发展银行"), ("CMBC", "中国民生银行"), ("HXBANK", "华夏银行"),
    ("SPABANK", "平安银行"), ("CIB", "兴业银行"), ("GDB", "广发银行"), ("CZBANK", "浙商银行"),
    ("BOHAIB", "渤海银行"),
]
_REGIONAL = [
    ("BJBANK", "北京银行"), ("SHBANK", "上海银行"), ("CQBANK", "重庆银行"), ("CQFMB", "重庆富民银行"),
    ("JLYLB", "吉林亿联银行"), ("JLRCU", "吉林省农村信用社"), ("GDRCC", "广东省农村信用社"),
]

BANKS: tuple[BankInfo, ...] = tuple(
    [BankInfo(code, name, common_pb2.BANK_KIND_NATIONAL) for code, name in _NATIONAL]
    + [BankInfo(code, name, common_pb2.BANK_KIND_REGIONAL) for code, name in _REGIONAL]
)
BY_CODE: dict[str, BankInfo] = {bank.code: bank for bank in BANKS}
BANK_CODES: tuple[str, ...] = tuple(bank.code for bank in BANKS)
# The most bank codes one request may name (each bank up to 4 times; duplicates are dropped).
# Every service checks this before it looks at any of them.
MAX_BANK_CODES = 4 * len(BANKS)


def bank_name(code: str) -> str:
    return BY_CODE[code].name
