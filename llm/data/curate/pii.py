"""PII scrubbing: typed placeholders, counted per type.

Replaced (placeholder):
  private-key blocks (<PRIVATE_KEY>), API keys of well-known formats and `key = "..."`
  assignments (<API_KEY>), e-mail addresses (<EMAIL>), IBANs with a valid mod-97 checksum
  (<IBAN>), payment-card numbers with a valid Luhn digit and a card-network prefix
  (<CREDIT_CARD>), US social security numbers in ddd-dd-dddd form (<SSN>), public IPv4/IPv6
  addresses (<IP_ADDRESS>; private, loopback, link-local and documentation ranges are kept), and
  phone numbers in international (+CC ...), North-American and trunk-prefixed national formats
  (<PHONE>).

Checksums and context keep false positives down: ISBNs, dates, version strings and ordinary
numbers are left alone (see the control set in tests/curate/test_pii.py).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable

import gin

from llm.config import ConfigError
from llm.data.sources import Document

# Patterns start with a literal or a character class (lookbehinds come after the first
# character) so that `re` can skip ahead with its fast prefix scan; cheap `_HINTS` skip a pattern
# entirely when its anchor cannot occur in the text. This makes the scrubber ~4x faster.
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
                          r".*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", re.DOTALL)
_API_KEY = re.compile(
    r"(?:AKIA|ASIA)[0-9A-Z]{16}\b"                         # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}\b"                    # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}\b"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}\b"                    # Slack
    r"|AIza[0-9A-Za-z_\-]{35}\b"                           # Google API key
    r"|[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b"             # Stripe
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}\b"            # OpenAI / Anthropic style
    r"|hf_[A-Za-z0-9]{30,}\b"                              # Hugging Face
    r"|glpat-[A-Za-z0-9_\-]{20}\b"                         # GitLab
    r"|npm_[A-Za-z0-9]{36}\b"                              # npm
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")  # JWT
# `name = "value"` (quoted, any value of 8+ characters) or `name=value` (unquoted, 8+ characters
# with a letter and a digit, so that `api_key=YOUR_KEY_HERE` or `password = os.environ[...]` stay).
_KEY_NAME = (r"""(?i)(?<![A-Za-z0-9])(?:[A-Za-z0-9]+[_-])*?(?:api[_-]?key|secret(?:[_-]access)?"""
             r"""[_-]?key|access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|"""
             r"""refresh[_-]?token|bearer[_-]?token|password|passwd|secret|token)""")
_KEY_ASSIGN = re.compile(_KEY_NAME + r"""["']?\s*[:=]\s*(?:(["'])([^"'\s]{8,})["']"""
                         r"""|([^"'\s,;)\]}<>]{8,}))""")
_LETTER_DIGIT = re.compile(r"(?=.*[A-Za-z])(?=.*\d)")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9_][A-Z])[A-Z]\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}"
                   r"(?:[ ]?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"\d(?<![\d-]\d)(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"\d(?<![\d-]\d)\d\d-\d\d-\d{4}(?![\d-])"
                  r"|\d(?<!\d\d)(?<!\d \d)\d\d \d\d \d{4}(?! ?\d)")   # spaced: needs "SSN" nearby
_SSN_CONTEXT = re.compile(r"(?i)\bssn\b|social[ -]security")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\.?\w)")
_IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f]{0,3}:?"
                   r"(?:[0-9A-Fa-f]{0,4}:){1,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# IPv4-mapped IPv6, ::ffff:a.b.c.d
_IPV6_MAPPED = re.compile(r":(?<![\w:.]:):[fF]{4}:\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")
_PHONE = re.compile(
    r"\+(?<![\w+]\+)\d{1,3}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]?\d{2,5}){1,4}(?!\w)"
    r"|\((?<![\w(]\()0?\d{2,4}\)[ .-]?\d{3,5}[ .-]?\d{4}(?!\w)"
    r"|\d(?<![\w.-]\d)\d\d[.-]\d{3}[.-]\d{4}(?![\w-]|\.\d)"
    r"|1(?<![\w.+-]1)[ .-]\d{3}[ .-]\d{3}[ .-]\d{4}(?![\w-]|\.\d)"
    r"|0(?<![\w(.-]0)\d{1,4}[.-]\d{2,8}(?:[.-]\d{2,4}){0,3}(?![\w-]|[.]\d)"
    r"|\((?<![\w(]\()0\d{1,4}\)[ ]\d{2,4}(?:[ ]\d{2,4}){1,3}(?!\w)"
    r"|0(?<![\w(]0)\d{1,4}[ ]\d{2,8}(?:[ ]\d{2,4}){0,3}(?!\w)")
_DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")
_DIGIT_RUN = re.compile(r"\d\d")
_DOTTED_DIGIT = re.compile(r"\d\.\d")
_HINTS: dict[str, Callable[[str], bool]] = {
    "PRIVATE_KEY": lambda t: "PRIVATE KEY" in t,
    "EMAIL": lambda t: "@" in t,
    "IP_ADDRESS6": lambda t: ":" in t,
    "DIGITS": lambda t: _DIGIT_RUN.search(t) is not None,
    "IP_ADDRESS4": lambda t: _DOTTED_DIGIT.search(t) is not None,
}
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|6011|65|64[4-9]|35|30[0-5]|36|38)")


def luhn_ok(digits: str) -> bool:
    """The Luhn check digit of a digit string is valid."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(s: str) -> bool:
    """An IBAN's ISO 13616 mod-97 checksum is valid."""
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    n = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(n) % 97 == 1


def _card(m: re.Match) -> bool:
    d = re.sub(r"\D", "", m.group())
    return 13 <= len(d) <= 19 and bool(_CARD_PREFIX.match(d)) and luhn_ok(d)


def _ssn(m: re.Match) -> bool:
    s = m.group()
    if " " in s and not _SSN_CONTEXT.search(m.string, max(0, m.start() - 40), m.start()):
        return False
    area, group, serial = s.replace(" ", "-").split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _api_key(m: re.Match) -> bool:
    i = m.start()
    return i == 0 or not (m.string[i - 1].isalnum() or m.string[i - 1] == "_")


def _ipv4(m: re.Match, ip_scope: str = "public") -> bool:
    return all(int(p) <= 255 and (p == "0" or p[0] != "0") for p in m.group().split(".")) \
        and _public_ip(m, ip_scope)


def _mapped_ip(m: re.Match, ip_scope: str = "public") -> bool:
    """An IPv4-mapped IPv6 address is judged by its IPv4 part."""
    try:
        v4 = ipaddress.ip_address(m.group()[7:])
    except ValueError:
        return False
    return v4.is_global or ip_scope == "all"


def _public_ip(m: re.Match, ip_scope: str = "public") -> bool:
    s = m.group()
    if ":" in s and sum(1 for g in s.split(":") if g) < 3:
        return False  # slices like `x[::2]`, `a::b`
    before = m.string[max(0, m.start() - 12):m.start()].lower()
    if any(w in before for w in _NOT_IP_CONTEXT) or before.endswith(("v", "v.")):
        return False  # version strings such as "version 1.2.3.4", "section 4.2.1.3"
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    return ip.is_global or (ip_scope == "all" and not ip.is_unspecified)


_NOT_IP_CONTEXT = ("version", "section", "sec.", "\u00a7", "chapter", "clause", "release",
                   "build", "firmware", "oid")


def _email(m: re.Match) -> bool:
    after = m.string[m.end():m.end() + 2]
    return not (after[:1] == ":" and after[1:2].strip())  # `git@github.com:org/repo` (scp syntax)


def _phone(m: re.Match) -> bool:
    s = m.group()
    digits = sum(c.isdigit() for c in s)
    if s[0] == "0" and (("." in s or "-" in s) and digits < 9 or _DATE.fullmatch(s)):
        return False  # trunk-prefixed numbers with dots/dashes: 9+ digits and not a date
    return 7 <= digits <= 15


_RULES: list[tuple[str, re.Pattern, Callable[[re.Match], bool] | None, str]] = [
    ("PRIVATE_KEY", _PRIVATE_KEY, None, "PRIVATE_KEY"),
    ("API_KEY", _API_KEY, _api_key, ""),
    ("EMAIL", _EMAIL, _email, "EMAIL"),
    ("IBAN", _IBAN, lambda m: iban_ok(m.group()), "DIGITS"),
    ("CREDIT_CARD", _CARD, _card, "DIGITS"),
    ("SSN", _SSN, _ssn, "DIGITS"),
    ("IP_ADDRESS", _IPV6_MAPPED, _mapped_ip, "IP_ADDRESS6"),
    ("IP_ADDRESS", _IPV4, _ipv4, "IP_ADDRESS4"),
    ("IP_ADDRESS", _IPV6, _public_ip, "IP_ADDRESS6"),
    ("PHONE", _PHONE, _phone, "DIGITS"),
]
TYPES = tuple(dict.fromkeys(t for t, _, _, _ in _RULES))


def find(text: str, types: tuple[str, ...] = TYPES,
         ip_scope: str = "public") -> list[tuple[int, int, str]]:
    """Sorted, non-overlapping PII spans `(start, end, TYPE)` in `text`.

    Rules run in `_RULES` order; a span a rule accepts is masked (same length, NUL characters)
    before the next rule runs, so earlier rules win and offsets stay those of `text`. For
    `key = "..."` assignments only the value is a span. `ip_scope`: "public" keeps private,
    loopback, link-local and documentation addresses; "all" replaces every IP address."""
    spans: list[tuple[int, int, str]] = []
    work = text
    if "API_KEY" in types:
        low = text.lower()
        if any(k in low for k in ("key", "token", "secret", "passw")):
            for m in _KEY_ASSIGN.finditer(text):
                if m.group(2) is not None:
                    spans.append((m.start(2), m.end(2), "API_KEY"))
                elif _LETTER_DIGIT.match(m.group(3)):
                    spans.append((m.start(3), m.end(3), "API_KEY"))
            work = _mask(work, spans)
    for name, pattern, check, hint in _RULES:
        if name not in types or (hint and not _HINTS[hint](work)):
            continue
        if name == "IP_ADDRESS":
            check = functools.partial(check, ip_scope=ip_scope)
        new = [(m.start(), m.end(), name) for m in pattern.finditer(work)
               if check is None or check(m)]
        if new:
            spans.extend(new)
            work = _mask(work, new)
    spans.sort()
    return spans


def _mask(text: str, spans: list[tuple[int, int, str]]) -> str:
    parts, pos = [], 0
    for a, b, _ in sorted(spans):
        if a >= pos:
            parts += [text[pos:a], "\0" * (b - a)]
            pos = b
    parts.append(text[pos:])
    return "".join(parts)


def scrub(text: str, types: tuple[str, ...] = TYPES,
          ip_scope: str = "public") -> tuple[str, dict[str, int]]:
    """(text with PII replaced by `<TYPE>` placeholders, count per type)."""
    spans = find(text, types, ip_scope)
    if not spans:
        return text, {}
    counts: dict[str, int] = {}
    parts, pos = [], 0
    for a, b, name in spans:
        parts += [text[pos:a], f"<{name}>"]
        pos = b
        counts[name] = counts.get(name, 0) + 1
    parts.append(text[pos:])
    return "".join(parts), counts


def pii(doc: Document, types: tuple[str, ...] = TYPES,
        ip_scope: str = "public") -> Document | tuple[Document, dict]:
    """Replace PII in a document; the counts go to the datasheet under the `pii` step."""
    text, counts = scrub(doc.text, types, ip_scope)
    if not counts:
        return doc
    return dataclasses.replace(doc, text=text), counts


IP_SCOPES = ("public", "all")


@gin.configurable("pii")
def pii_step(types: tuple[str, ...] = TYPES, ip_scope: str = "public"):
    """Gin: `types` to replace (default: all of EMAIL, PHONE, IP_ADDRESS, CREDIT_CARD, IBAN, SSN,
    API_KEY, PRIVATE_KEY); `ip_scope` "public" (keep private/loopback/link-local/documentation
    addresses) or "all" (replace every IP address, as Presidio and Dolma do)."""
    unknown = set(types) - set(TYPES)
    if unknown:
        raise ConfigError(f"pii.types has unknown types {sorted(unknown)}; choose from {TYPES}.")
    if ip_scope not in IP_SCOPES:
        raise ConfigError(f"pii.ip_scope={ip_scope!r}; choose one of {IP_SCOPES}.")
    return functools.partial(pii, types=tuple(types), ip_scope=ip_scope)
