"""`cardcheck load`: load tests of the whole public journey, at an open-loop arrival rate.

- `schedule`: when journeys are due (Poisson arrivals, an optional linear ramp).
- `mix`: which stages a journey runs (register, sign_in, query, watch, report), by weight.
- `users`: the people journeys run as, from a bank dataset or a users file, and their provisioning.
- `journey`: one journey's stages against the gateway, codes read from the sandbox inbox.
- `recording`: HDR histograms per stage and per time window, errors by reason.
- `progress`, `report`: the live line, the final table, summary.json and report.html.
- `thresholds`: `journey.p99_ms<5000` and the like, checked against the summary.
- `run`: the command line and the run itself.
"""

# bank_sim's population under `cardcheck up --load-test` (without --dataset), and the one this
# command generates by default: one query per person per 7 days, so a load test needs many
# people. The generator is deterministic and extends a population without changing it, so its
# first 200 are the people of a plain `cardcheck up`.
LOAD_TEST_PEOPLE = 5000
