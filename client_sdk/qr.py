"""QR codes for pairing payloads: terminal text, PNG and SVG.

Built on segno, which is pure Python, so the SDK needs no imaging stack. Any string works,
but the two payloads that matter are a pairing's ``qr_payload``: ``pns://pair?...`` for the
authenticator app and ``otpauth://totp/...`` for a third-party TOTP app.

Example:
    >>> from client_sdk.qr import qr_text
    >>> text = qr_text("pns://pair?server=https%3A%2F%2Fpns.example&token=pnsp_x")
    >>> max(len(line) for line in text.splitlines()) <= 80
    True
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import segno

__all__ = ["QUIET_ZONE", "TERMINAL_COLUMNS", "make_qr", "qr_text", "save_png", "save_svg"]

# ISO/IEC 18004 asks for four light modules around the symbol; scanners are fussy without it.
QUIET_ZONE = 4
TERMINAL_COLUMNS = 80
# One module per column: version v is 17 + 4v modules wide, plus the quiet zone on both sides.
_MAX_TERMINAL_VERSION = (TERMINAL_COLUMNS - 2 * QUIET_ZONE - 17) // 4

# Half blocks pack two module rows into one text line; indexed by (upper lit, lower lit).
_HALF_BLOCKS = {
    (False, False): " ",
    (True, False): "\u2580",  # ▀
    (False, True): "\u2584",  # ▄
    (True, True): "\u2588",  # █
}

PathArg = str | PathLike[str]


def make_qr(payload: str, *, error: str = "M") -> segno.QRCode:
    """The segno QR code for ``payload`` (never a Micro QR, which phones rarely read).

    ``error`` is the lowest acceptable error-correction level; segno raises it further when
    that costs no extra size.

    Example:
        >>> make_qr("otpauth://totp/PNS:ann?secret=JBSWY3DPEHPK3PXP&issuer=PNS").version
        4
    """
    if not payload:
        raise ValueError("the QR payload is empty")
    return segno.make(payload, error=error, micro=False, boost_error=True)


def qr_text(payload: str, *, light_on_dark: bool = True) -> str:
    """The QR code as Unicode half blocks, at most 80 columns wide, quiet zone included.

    Each character covers one module column and two module rows. Most terminals draw light
    text on a dark background, so by default the *light* modules are printed as blocks (as
    ``qrencode -t UTF8`` does); pass ``light_on_dark=False`` for dark-on-light terminals.
    The error-correction level is the highest that still fits 80 columns.

    Raises ValueError when the payload is too long to fit 80 columns at any level.

    Example:
        >>> print(qr_text("pns://pair?server=https%3A%2F%2Fpns.example&token=pnsp_x"))
        ... # doctest: +SKIP
    """
    qr = _terminal_qr(payload)
    rows = [[bool(m) for m in row] for row in qr.matrix_iter(scale=1, border=QUIET_ZONE)]
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))  # pad with a light row; it is quiet zone anyway

    def lit(dark: bool) -> bool:
        return dark != light_on_dark

    lines = []
    for upper, lower in zip(rows[0::2], rows[1::2], strict=True):
        lines.append(
            "".join(_HALF_BLOCKS[lit(u), lit(d)] for u, d in zip(upper, lower, strict=True))
        )
    return "\n".join(lines)


def _terminal_qr(payload: str) -> segno.QRCode:
    for error in ("M", "L"):
        qr = make_qr(payload, error=error)
        if isinstance(qr.version, int) and qr.version <= _MAX_TERMINAL_VERSION:
            return qr
    raise ValueError(
        f"the payload ({len(payload)} characters) is too long for a QR code that fits "
        f"{TERMINAL_COLUMNS} terminal columns; write it to a PNG or SVG file instead"
    )


def save_png(payload: str, path: PathArg, *, scale: int = 8) -> Path:
    """Write the QR code as a PNG (``scale`` pixels per module, quiet zone included).

    Example:
        >>> save_png("pns://pair?server=https%3A%2F%2Fpns.example&token=pnsp_x", "pair.png")
        ... # doctest: +SKIP
        PosixPath('pair.png')
    """
    if scale < 1:
        raise ValueError("scale must be at least 1 pixel per module")
    target = Path(path)
    make_qr(payload).save(str(target), kind="png", scale=scale, border=QUIET_ZONE)
    return target


def save_svg(payload: str, path: PathArg, *, scale: int = 8) -> Path:
    """Write the QR code as a standalone SVG document (quiet zone included).

    Example:
        >>> save_svg("otpauth://totp/PNS:ann?secret=JBSWY3DPEHPK3PXP", "totp.svg")
        ... # doctest: +SKIP
        PosixPath('totp.svg')
    """
    if scale < 1:
        raise ValueError("scale must be at least 1 unit per module")
    target = Path(path)
    make_qr(payload).save(
        str(target), kind="svg", scale=scale, border=QUIET_ZONE, xmldecl=True, svgns=True
    )
    return target
