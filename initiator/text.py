"""iSCSI text: ``key=value`` pairs, their value grammars, and text cut across PDUs (RFC 7143 §6.1).

Theory of operation
-------------------
Login and Text PDUs carry a data segment of ``key=value`` pairs, each followed by exactly one NUL
byte (§6.1). A text longer than the receiver's MaxRecvDataSegmentLength is cut across several
PDUs: each PDU but the last has its C (continue) bit set, and the cut may fall anywhere, even in
the middle of a key or a value. The concatenated pieces form one *logical text data segment*
(LTDS), which is decoded only when the piece with C=0 arrives.

The module has three layers, all pure (no sockets, no clock):

* framing — :func:`encode` and :func:`decode` turn a list of pairs into bytes and back. Key names
  are checked against the §6.1 standard-label grammar (plus the ``X#`` public extension form of
  §13.22/RFC 4850), values must be UTF-8, and a key may appear only once (§6.2) unless the caller
  names it repeatable (TargetName/TargetAddress in a SendTargets answer, §13.3).
* values — parsers and formatters for the value grammars of §6.1: boolean-value, numerical-value
  (decimal-constant or hex-constant, base64 accepted for large values), binary-value (hex or
  base64, with the implicit byte length rules), numeric-range, list-of-values, text-value,
  iSCSI-name-value and iSCSI-local-name-value, with their length limits.
* segmentation — :class:`TextSplitter` cuts encoded text into pieces of at most N bytes (N is the
  peer's MaxRecvDataSegmentLength; 8192 during login until the peer declares it, §13.12), and
  :class:`TextAssembler` joins the pieces back, refusing a text larger than its cap.

Errors: malformed text from the peer raises :class:`TextFormatError` (a ``PDUFormatError`` and a
``NegotiationError``) or one of its subclasses, each naming the offending key or bytes. Asking this
module to *produce* malformed text is a bug in the caller and raises ``LocalProtocolError``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from initiator.errors import LocalProtocolError, NegotiationError, PDUFormatError

__all__ = [
    "MAX_BINARY_VALUE_LENGTH",
    "MAX_ISCSI_NAME_LENGTH",
    "MAX_KEY_NAME_LENGTH",
    "MAX_NUMERICAL_VALUE",
    "MAX_SIMPLE_VALUE_LENGTH",
    "MAX_TEXT_LENGTH",
    "MIN_TEXT_LENGTH",
    "Answer",
    "BinaryEncoding",
    "DuplicateKeyError",
    "Pair",
    "TextAssembler",
    "TextFormatError",
    "TextSegment",
    "TextSplitter",
    "TextValueError",
    "check_iscsi_name",
    "check_key_name",
    "check_local_name",
    "check_simple_value",
    "check_text_value",
    "decode",
    "encode",
    "format_binary",
    "format_boolean",
    "format_list",
    "format_number",
    "is_extension_key",
    "is_key_name",
    "is_utf8",
    "parse_binary",
    "parse_boolean",
    "parse_list",
    "parse_number",
    "parse_range",
    "split_text",
]

Pair = tuple[str, str]
"""One ``(key, value)`` pair, in wire order."""

# §6.1: "A standard-label MUST begin with a capital letter and must not exceed 63 characters."
MAX_KEY_NAME_LENGTH = 63
# §6.1: "If not otherwise specified, the maximum length of a simple-value (not its encoded
# representation) is 255 bytes, not including the delimiter (comma or zero byte)."
MAX_SIMPLE_VALUE_LENGTH = 255
# §4.2.7.1: iSCSI names are at most 223 bytes of UTF-8.
MAX_ISCSI_NAME_LENGTH = 223
# §12.1.3: CHAP C and R "binary length (not the length of the character string that represents
# them in encoded form) MUST NOT exceed 1024 bytes".
MAX_BINARY_VALUE_LENGTH = 1024
# §6.1: numerical-value is "an unsigned integer always less than 2**64".
MAX_NUMERICAL_VALUE = 2**64 - 1
# §6.1: every implementation "MUST support receiving at least 8192 bytes of key=value data in a
# negotiation sequence", and at least 64 KiB when an authentication method needs long items.
MIN_TEXT_LENGTH = 8192
MAX_TEXT_LENGTH = 65536


class Answer(enum.StrEnum):
    """The reserved answer constants of §6.2: never proposed, only answered."""

    NOT_UNDERSTOOD = "NotUnderstood"
    REJECT = "Reject"
    IRRELEVANT = "Irrelevant"


class BinaryEncoding(enum.Enum):
    """How a binary-value is written (§6.1): hex-constant or base64-constant."""

    HEX = "0x"
    BASE64 = "0b"


class TextFormatError(PDUFormatError, NegotiationError):
    """Text from the peer that does not follow §6.1 (framing, key names, encodings)."""


class TextValueError(TextFormatError):
    """A value that does not follow its §6.1 grammar or exceeds its length limit."""

    def __init__(self, message: str, *, key: str, value: str) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


class DuplicateKeyError(TextFormatError):
    """A key sent twice in one text (§6.2: a key may be negotiated only once)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


# --- key names -----------------------------------------------------------------------------

# §6.1 standard-label: letters, digits, dot, minus, plus, commercial at, underscore. The RFC says
# the first character is a capital letter, but its own iSCSIProtocolLevel (§13.24) starts with a
# lower-case "i", so any letter is accepted first. The §13.22 public extension keys ("X#" followed
# by an IANA-registered string, e.g. X#NodeArchitecture of RFC 4850) use "#", which a standard
# label does not allow, so they get their own form.
_STANDARD_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9.\-+@_]*", re.ASCII)
_PUBLIC_EXTENSION = re.compile(r"X#[A-Za-z0-9.\-+@_]+", re.ASCII)


def is_key_name(name: str) -> bool:
    """True when ``name`` is a well-formed key name (§6.1, §13.22)."""
    if not 0 < len(name) <= MAX_KEY_NAME_LENGTH:
        return False
    return bool(_STANDARD_LABEL.fullmatch(name) or _PUBLIC_EXTENSION.fullmatch(name))


def is_extension_key(name: str) -> bool:
    """True for private (``X-``) and public (``X#``) extension keys (§13.22)."""
    return name.startswith(("X-", "X#"))


def check_key_name(name: str) -> None:
    """Raise :class:`TextFormatError` unless ``name`` is a well-formed key name."""
    if is_key_name(name):
        return
    if len(name) > MAX_KEY_NAME_LENGTH:
        raise TextFormatError(
            f"key name {_show(name)} is {len(name)} characters long; RFC 7143 §6.1 allows at "
            f"most {MAX_KEY_NAME_LENGTH}"
        )
    raise TextFormatError(
        f"key name {_show(name)} is malformed: RFC 7143 §6.1 allows a letter followed by "
        "letters, digits and . - + @ _ (or X# followed by such characters)"
    )


# --- framing --------------------------------------------------------------------------------


def encode(pairs: Iterable[Pair]) -> bytes:
    """Encode pairs as ``key=value\\0`` text (§6.1).

    Raises ``LocalProtocolError`` for a malformed key name or a value containing NUL: the caller
    asked for text the protocol cannot carry. Values are not checked against their key's grammar
    here; that is the business of the key table (``initiator.keys``) and of the CHAP module.
    """
    out = bytearray()
    for key, value in pairs:
        if not is_key_name(key):
            raise LocalProtocolError(f"cannot send key {_show(key)}: not a valid key name (§6.1)")
        if "\0" in value:
            raise LocalProtocolError(f"cannot send {key}: its value contains a NUL byte")
        out += key.encode("ascii")
        out += b"="
        out += value.encode("utf-8")
        out += b"\0"
    return bytes(out)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    repeatable: Collection[str] = (),
) -> list[Pair]:
    """Decode one complete logical text data segment into pairs, in wire order (§6.1).

    Every pair must end with a NUL. A run of extra NULs after the last pair is tolerated: some
    targets count the zero padding of the data segment in DataSegmentLength. A key may appear only
    once (§6.2) unless it is in ``repeatable``.
    """
    raw = bytes(data)
    if not raw:
        return []
    if raw[-1] != 0:
        tail = raw[-32:]
        raise TextFormatError(
            f"text does not end with a NUL delimiter (RFC 7143 §6.1); it ends with {tail!r}"
        )
    body = raw.rstrip(b"\0")
    if not body:
        return []
    pairs: list[Pair] = []
    seen: set[str] = set()
    for item in body.split(b"\0"):
        if not item:
            raise TextFormatError("text contains an empty key=value entry (two NULs in a row)")
        key_bytes, sep, value_bytes = item.partition(b"=")
        if not sep:
            raise TextFormatError(f"text entry {_show_bytes(item)} has no '=' (RFC 7143 §6.1)")
        try:
            key = key_bytes.decode("ascii")
        except UnicodeDecodeError:
            raise TextFormatError(
                f"key name {_show_bytes(key_bytes)} is not ASCII (RFC 7143 §6.1)"
            ) from None
        check_key_name(key)
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise TextFormatError(
                f"value of key {key} is not valid UTF-8: {_show_bytes(value_bytes)}"
            ) from None
        if key in seen and key not in repeatable:
            raise DuplicateKeyError(
                f"key {key} appears more than once in one text (RFC 7143 §6.2)", key=key
            )
        seen.add(key)
        pairs.append((key, value))
    return pairs


# --- values ---------------------------------------------------------------------------------

_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_HEX = re.compile(r"0[xX][0-9A-Fa-f]+", re.ASCII)
_BASE64 = re.compile(r"0[bB]([A-Za-z0-9+/]+)(=*)", re.ASCII)
# §6.1 text-value: letters, digits, dot, minus, plus, commercial at, underscore, slash, left and
# right bracket, colon.
_TEXT_VALUE = re.compile(r"[A-Za-z0-9.\-+@_/\[\]:]*", re.ASCII)
# ASCII characters an iSCSI name may hold (§4.2.7.2: the stringprep output plus "-", ".", ":").
# Non-ASCII characters are allowed (the stringprep profile keeps most Unicode letters).
_ISCSI_NAME_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:")


def is_utf8(value: str) -> bool:
    """``value`` has a UTF-8 form. A command-line argument or environment variable holding
    bytes that are not UTF-8 reaches Python as lone surrogates (PEP 383), which have none:
    encoding them raises UnicodeEncodeError, so every string a person gives is checked here
    before it is measured, sent or hashed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_size(value: str, *, key: str) -> int:
    """The length of ``value`` in UTF-8; :class:`TextValueError` when it is not UTF-8 text
    (:func:`is_utf8`), which no text key can carry (RFC 7143 §6.1)."""
    if not is_utf8(value):
        raise TextValueError(
            f"{key} {_show(value)} is not UTF-8 text; iSCSI text values are UTF-8 (RFC 7143 §6.1)",
            key=key,
            value=value,
        )
    return len(value.encode("utf-8"))


def check_simple_value(value: str, *, key: str, limit: int = MAX_SIMPLE_VALUE_LENGTH) -> None:
    """Raise :class:`TextValueError` when ``value`` is longer than ``limit`` bytes (§6.1)."""
    size = utf8_size(value, key=key)
    if size > limit:
        raise TextValueError(
            f"value of {key} is {size} bytes long; RFC 7143 §6.1 allows at most {limit}",
            key=key,
            value=value,
        )


def check_text_value(value: str, *, key: str) -> None:
    """Raise :class:`TextValueError` unless ``value`` is a §6.1 text-value of at most 255 bytes."""
    check_simple_value(value, key=key)
    if not _TEXT_VALUE.fullmatch(value):
        raise TextValueError(
            f"value {_show(value)} of {key} is not a text-value: RFC 7143 §6.1 allows letters, "
            "digits and . - + @ _ / [ ] :",
            key=key,
            value=value,
        )


def check_iscsi_name(value: str, *, key: str) -> None:
    """Raise :class:`TextValueError` unless ``value`` can be an iSCSI name (§4.2.7, §6.1).

    The check is the character set and the 223-byte limit; the iqn./eui./naa. formats themselves
    are checked by whoever parses names for meaning.
    """
    if not value:
        raise TextValueError(f"{key} is empty; an iSCSI name is required", key=key, value=value)
    size = utf8_size(value, key=key)
    if size > MAX_ISCSI_NAME_LENGTH:
        raise TextValueError(
            f"{key} is {size} bytes long; iSCSI names are at most {MAX_ISCSI_NAME_LENGTH} bytes "
            "(RFC 7143 §4.2.7.1)",
            key=key,
            value=value,
        )
    for ch in value:
        if ord(ch) < 0x80 and ch not in _ISCSI_NAME_ASCII:
            raise TextValueError(
                f"{key} {_show(value)} contains {ch!r}; iSCSI names hold letters, digits, "
                "'-', '.', ':' and non-ASCII characters only (RFC 7143 §4.2.7.2)",
                key=key,
                value=value,
            )
        if ord(ch) >= 0x80 and not ch.isprintable():
            raise TextValueError(
                f"{key} {_show(value)} contains the unprintable character {ch!r}",
                key=key,
                value=value,
            )


def check_local_name(value: str, *, key: str) -> None:
    """Raise :class:`TextValueError` unless ``value`` is an iSCSI-local-name-value (§6.1).

    Aliases are free UTF-8 text without NUL, at most 255 bytes.
    """
    check_simple_value(value, key=key)
    if "\0" in value:
        raise TextValueError(f"{key} contains a NUL character", key=key, value=value)


def parse_boolean(value: str, *, key: str) -> bool:
    """Parse a §6.1 boolean-value: exactly ``Yes`` or ``No``."""
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise TextValueError(
        f"value {_show(value)} of {key} is not a boolean-value (Yes or No, RFC 7143 §6.1)",
        key=key,
        value=value,
    )


def format_boolean(flag: bool) -> str:
    """Format a boolean-value."""
    return "Yes" if flag else "No"


def parse_number(value: str, *, key: str, large: bool = False) -> int:
    """Parse a numerical-value (§6.1): decimal-constant, hex-constant or base64-constant.

    A decimal-constant has no leading zeros ("0" alone, or a digit 1-9 followed by digits), so
    ``010`` is refused rather than guessed at (C's strtoul would read it as octal). §6.1 reserves
    base64 for large-numerical-values; it is accepted here for any number because the value is
    unambiguous. Unless ``large`` is set, the result must be below 2**64.
    """
    if _DECIMAL.fullmatch(value):
        number = int(value, 10)
    elif _HEX.fullmatch(value):
        number = int(value[2:], 16)
    elif _BASE64.fullmatch(value):
        number = int.from_bytes(_decode_base64(value, key=key), "big")
    else:
        raise TextValueError(
            f"value {_show(value)} of {key} is not a number: RFC 7143 §6.1 allows a decimal "
            "constant without leading zeros, 0x followed by hex digits, or 0b followed by base64",
            key=key,
            value=value,
        )
    if not large and number > MAX_NUMERICAL_VALUE:
        raise TextValueError(
            f"value {_show(value)} of {key} is not below 2**64 (RFC 7143 §6.1 numerical-value)",
            key=key,
            value=value,
        )
    return number


def format_number(number: int) -> str:
    """Format a numerical-value as a decimal-constant."""
    if number < 0:
        raise LocalProtocolError(f"cannot send the negative number {number}")
    return str(number)


def parse_range(value: str, *, key: str) -> tuple[int, int]:
    """Parse a numeric-range ``low~high`` (§6.1); ``high`` must not be lower than ``low``."""
    low_text, sep, high_text = value.partition("~")
    if not sep:
        raise TextValueError(
            f"value {_show(value)} of {key} is not a range (two numbers separated by '~')",
            key=key,
            value=value,
        )
    low = parse_number(low_text, key=key)
    high = parse_number(high_text, key=key)
    if high < low:
        raise TextValueError(
            f"range {_show(value)} of {key} ends below its start (RFC 7143 §6.1)",
            key=key,
            value=value,
        )
    return low, high


def parse_binary(
    value: str,
    *,
    key: str,
    max_length: int = MAX_BINARY_VALUE_LENGTH,
) -> bytes:
    """Parse a binary-value written as a hex-constant or base64-constant (§6.1).

    A hex-constant of n digits has an implicit byte length of (n + 1) // 2: an odd number of
    digits means a leading zero nibble. A base64-constant of n characters (not counting the
    optional trailing '=') is n * 3 // 4 bytes; n of the form 4k + 1 cannot be correct. Decimal
    constants are refused: binary values on the wire here (CHAP C and R) always carry a prefix.
    """
    if _HEX.fullmatch(value):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits
        data = bytes.fromhex(digits)
    elif _BASE64.fullmatch(value):
        data = _decode_base64(value, key=key)
    else:
        raise TextValueError(
            f"value {_show(value)} of {key} is not a binary-value: RFC 7143 §6.1 requires 0x "
            "followed by hex digits or 0b followed by base64",
            key=key,
            value=value,
        )
    if len(data) > max_length:
        raise TextValueError(
            f"value of {key} is {len(data)} bytes long; at most {max_length} are allowed",
            key=key,
            value=value,
        )
    return data


def format_binary(data: bytes, encoding: BinaryEncoding = BinaryEncoding.HEX) -> str:
    """Format bytes as a hex-constant (``0x...``) or base64-constant (``0b...``)."""
    if not data:
        raise LocalProtocolError("cannot send an empty binary-value")
    if encoding is BinaryEncoding.HEX:
        return "0x" + data.hex()
    return "0b" + base64.b64encode(data).decode("ascii")


def parse_list(value: str, *, key: str) -> tuple[str, ...]:
    """Parse a list-of-values: text-values separated by commas (§6.1)."""
    items = tuple(value.split(","))
    for item in items:
        if not item:
            raise TextValueError(
                f"list {_show(value)} of {key} has an empty item", key=key, value=value
            )
        check_text_value(item, key=key)
    return items


def format_list(values: Sequence[str]) -> str:
    """Format a list-of-values."""
    if not values:
        raise LocalProtocolError("cannot send an empty list-of-values")
    for item in values:
        if not item or "," in item:
            raise LocalProtocolError(f"cannot send {item!r} as an item of a list-of-values")
    return ",".join(values)


def _decode_base64(value: str, *, key: str) -> bytes:
    match = _BASE64.fullmatch(value)
    if match is None:  # pragma: no cover - callers match first
        raise TextValueError(f"{key}: {_show(value)} is not base64", key=key, value=value)
    digits, padding = match.group(1), match.group(2)
    # §6.1: n base64 characters (without '=') hold n*3//4 bytes; 4k+1 characters are impossible.
    if len(digits) % 4 == 1:
        raise TextValueError(
            f"base64 value {_show(value)} of {key} has an impossible length", key=key, value=value
        )
    if padding and (len(padding) > 2 or (len(digits) + len(padding)) % 4):
        raise TextValueError(
            f"base64 value {_show(value)} of {key} has wrong padding", key=key, value=value
        )
    try:
        return base64.b64decode(digits + "=" * (-len(digits) % 4), validate=True)
    except binascii.Error as exc:  # pragma: no cover - the regex admits only valid characters
        raise TextValueError(
            f"base64 value {_show(value)} of {key} does not decode: {exc}", key=key, value=value
        ) from None


# --- segmentation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextSegment:
    """One piece of a text, for one Login or Text PDU.

    ``more`` is the C (continue) bit: True on every piece but the last (§11.10.2, §11.12.2).
    A PDU with C=1 must have T=0.
    """

    data: bytes
    more: bool


class TextSplitter:
    """Cuts an encoded text into pieces of at most ``max_segment_length`` bytes (§6.1).

    ``max_segment_length`` is the receiver's MaxRecvDataSegmentLength: its declared value, or 8192
    before it declared one (§13.12). The cut may fall anywhere, even in the middle of a
    ``key=value``, as §6.1 allows. An empty text is one empty piece with C=0.
    """

    __slots__ = ("_data", "_done", "_max", "_offset")

    def __init__(self, text: bytes | bytearray | memoryview, max_segment_length: int) -> None:
        if max_segment_length < 1:
            raise LocalProtocolError(
                f"cannot split text into segments of {max_segment_length} bytes"
            )
        self._data = bytes(text)
        self._max = max_segment_length
        self._offset = 0
        self._done = False

    @property
    def done(self) -> bool:
        """True once the final piece (C=0) has been handed out."""
        return self._done

    @property
    def remaining(self) -> int:
        """Bytes not yet handed out."""
        return len(self._data) - self._offset

    def next_segment(self) -> TextSegment:
        """The next piece; raises ``LocalProtocolError`` after the final one."""
        if self._done:
            raise LocalProtocolError("the whole text has already been sent")
        end = min(self._offset + self._max, len(self._data))
        piece = self._data[self._offset : end]
        self._offset = end
        more = end < len(self._data)
        self._done = not more
        return TextSegment(piece, more)

    def __iter__(self) -> Iterator[TextSegment]:
        while not self._done:
            yield self.next_segment()


def split_text(
    text: bytes | bytearray | memoryview, max_segment_length: int
) -> list[TextSegment]:
    """All the pieces of ``text`` at once (see :class:`TextSplitter`)."""
    return list(TextSplitter(text, max_segment_length))


class TextAssembler:
    """Joins pieces of a text received across PDUs and decodes it when the last one arrives.

    ``feed(segment, more)`` returns None while C=1 pieces arrive and the decoded pair list when
    the C=0 piece arrives; the assembler is then empty and ready for the next text. A text longer
    than ``max_length`` bytes raises :class:`TextFormatError` (§6.1 obliges a receiver to take
    8192 bytes, 64 KiB when authentication needs long items; it does not oblige unbounded memory).
    Any error empties the assembler.
    """

    __slots__ = ("_buffer", "_max", "_repeatable")

    def __init__(
        self,
        *,
        max_length: int = MAX_TEXT_LENGTH,
        repeatable: Collection[str] = (),
    ) -> None:
        if max_length < MIN_TEXT_LENGTH:
            raise LocalProtocolError(
                f"a text cap of {max_length} bytes is below the {MIN_TEXT_LENGTH} bytes that "
                "RFC 7143 §6.1 obliges every receiver to accept"
            )
        self._buffer = bytearray()
        self._max = max_length
        self._repeatable = frozenset(repeatable)

    @property
    def buffered(self) -> int:
        """Bytes received so far of a text not yet complete."""
        return len(self._buffer)

    def reset(self) -> None:
        """Drop a partly received text."""
        self._buffer.clear()

    def feed(self, segment: bytes | bytearray | memoryview, more: bool) -> list[Pair] | None:
        """Add one PDU's data segment; ``more`` is that PDU's C bit."""
        if len(self._buffer) + len(segment) > self._max:
            total = len(self._buffer) + len(segment)
            self.reset()
            raise TextFormatError(
                f"the peer's text exceeds {self._max} bytes ({total} received so far); "
                "it is refused rather than buffered without bound"
            )
        self._buffer += segment
        if more:
            return None
        data = bytes(self._buffer)
        self.reset()
        return decode(data, repeatable=self._repeatable)


def _show(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _show_bytes(data: bytes, limit: int = 80) -> str:
    return repr(data if len(data) <= limit else data[:limit] + b"...")
