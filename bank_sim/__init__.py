"""The bank simulator: stands in for the 24 issuing banks on one port, answering
cardcheck.v1.IssuingBank from a `cardcheck-bank-dataset/1` file (or a generated population)."""
