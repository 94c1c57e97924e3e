"""Regression checks of the PII rules: planted values in the formats the rules support are all
replaced, and a control set is untouched.

The generator below writes only supported formats, so this is not a quality figure: precision and
recall are measured on the frozen, independently written set (tests/curate/eval_sets/pii.jsonl,
graded in tests/curate/test_eval_sets.py, reported in docs/curation.md).
"""

import random

from llm.data.curate.pii import iban_ok, luhn_ok, scrub


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError


def _iban(country: str, bban: str) -> str:
    n = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - n % 97:02d}{bban}"


def _planted(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for i in range(40):
        user = rng.choice(["jane.doe", "j_smith+news", "ops", "li.wei"]) + str(i)
        out.append(("EMAIL", f"{user}@{rng.choice(['example.com', 'mail.co.uk', 'uni.edu'])}"))
        out.append(("PHONE", rng.choice([
            f"+1 415 555 {rng.randint(1000, 9999)}", f"+44 20 7946 {rng.randint(1000, 9999)}",
            f"+49 30 {rng.randint(1000000, 9999999)}", f"+33 1 23 45 {rng.randint(10, 99)} 89",
            f"(212) 555-{rng.randint(1000, 9999)}", f"415-555-{rng.randint(1000, 9999)}",
            f"+91 98765 {rng.randint(10000, 99999)}", f"020 7946 {rng.randint(1000, 9999)}",
            f"+81-3-1234-{rng.randint(1000, 9999)}"])))
        out.append(("IP_ADDRESS", rng.choice([
            f"{rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
            f"{rng.randint(1, 254)}",
            f"2a00:1450:4001:{rng.randint(100, 999):x}::200e",
            f"2606:4700:{rng.randint(1, 9999):x}:0:0:0:6810:{rng.randint(1, 9999):x}"])))
        card = rng.choice([("4", 16), ("51", 16), ("37", 15), ("6011", 16)])
        num = _luhn_complete(card[0], card[1], rng)
        if rng.random() < 0.5:
            num = " ".join(num[k:k + 4] for k in range(0, len(num), 4))
        out.append(("CREDIT_CARD", num))
        bban = rng.choice([("DE", "37040044" + f"{rng.randint(0, 10**10 - 1):010d}"),
                           ("GB", "NWBK6016" + f"{rng.randint(0, 10**6 - 1):06d}"
                                  + f"{rng.randint(10, 99)}"),
                           ("FR", f"{rng.randint(0, 10**23 - 1):023d}")])
        iban = _iban(*bban)
        if rng.random() < 0.5:
            iban = " ".join(iban[k:k + 4] for k in range(0, len(iban), 4))
        out.append(("IBAN", iban))
        out.append(("SSN", f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-"
                           f"{rng.randint(1000, 9999)}"))
        key = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        tok = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789")
                      for _ in range(36))
        out.append(("API_KEY", rng.choice([f"AKIA{key}", f"ghp_{tok}", f"sk-proj-{tok}",
                                           f"xoxb-{tok[:12]}-{tok[12:24]}", f"hf_{tok}"])))
        out.append(("PRIVATE_KEY", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow" + tok +
                    "\n" + tok + "==\n-----END RSA PRIVATE KEY-----"))
    return out


def test_planted_pii_recall():
    rng = random.Random(0)
    planted = _planted(rng)
    found, per_type = 0, {}
    for kind, value in planted:
        text = f"Please contact us: {value}. Thanks for reading."
        new, counts = scrub(text)
        ok = counts.get(kind, 0) == 1 and value not in new and f"<{kind}>" in new
        per_type.setdefault(kind, []).append(ok)
        found += ok
    for kind, oks in per_type.items():
        assert sum(oks) / len(oks) >= 0.99, kind
    assert found / len(planted) >= 0.99
    assert len(per_type) == 8


def test_short_public_ips_and_sentence_ends():
    new, counts = scrub("Resolvers 8.8.8.8 and 1.1.1.1. Mail root@host.io.")
    assert counts == {"IP_ADDRESS": 2, "EMAIL": 1}
    assert new == "Resolvers <IP_ADDRESS> and <IP_ADDRESS>. Mail <EMAIL>."


def test_key_assignment_and_counts():
    text = 'API_KEY = "q8ZrT4pLm2Vx9sKd7"\nmail a@b.org, c@d.org'
    new, counts = scrub(text)
    assert counts == {"API_KEY": 1, "EMAIL": 2}
    assert new == 'API_KEY = "<API_KEY>"\nmail <EMAIL>, <EMAIL>'


CONTROL = """
Python 3.11.7 was released on 2023-12-04; numpy 2.4.6 and version 1.2.3.4 of the tool.
ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2 are book numbers.
The population grew from 1,234,567 to 2,345,678 between 1990 and 2020 (a 90% rise).
Meeting at 12:30:45 on 01/15/2024 in room 4521; order #88213 costs $1,299.99.
Private hosts 192.168.1.10, 10.0.0.1, 127.0.0.1 and fe80::1 and ::1 are not public.
Documentation ranges 192.0.2.1 and 2001:db8::1 are reserved for examples.
Card-like 4111 1111 1111 1112 fails Luhn; 1234 5678 9012 3456 too.
The IBAN-like DE00 1234 5678 9012 3456 78 has a bad checksum.
def f(x): return x[1:3] + y[::2]; a = {"k": 1}; print(f"{a!r}")
mailto is written as user at example dot com; the ratio was 3:2:1.
SSN-like 000-12-3456 and 666-12-3456 are never issued.
Coordinates 48.8566, 2.3522; pi = 3.14159265358979; e = 2.718281828459045.
Timestamp 1700000000123 and hash deadbeefcafebabe0123456789abcdef.
"""


def test_control_set_has_no_false_positives():
    new, counts = scrub(CONTROL)
    assert counts == {}, counts
    assert new == CONTROL


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
