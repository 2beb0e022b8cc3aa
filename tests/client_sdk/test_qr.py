"""QR codes decode, with a real decoder, to exactly the payload they were made from."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from client_sdk.qr import QUIET_ZONE, TERMINAL_COLUMNS, qr_text, save_png, save_svg

PAIR_PAYLOAD = (
    "pns://pair?server=https%3A%2F%2Fpns.example.com%3A8443"
    "&token=pnsp_Zx3-q8Kf0pLm2NvR7sT1uW4yB6cD9eGhJkQ5aXoVbYi"
)
OTPAUTH_URI = (
    "otpauth://totp/PNS:FILESRV01%20Google%20Authenticator"
    "?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=PNS&algorithm=SHA1&digits=6&period=30"
)
PAYLOADS = pytest.mark.parametrize("payload", [PAIR_PAYLOAD, OTPAUTH_URI], ids=["app", "totp"])


def decode(image: Image.Image) -> list[str]:
    return [barcode.text for barcode in zxingcpp.read_barcodes(image.convert("L"))]


@PAYLOADS
def test_png_decodes_to_the_exact_payload(tmp_path: Path, payload: str) -> None:
    path = save_png(payload, tmp_path / "pair.png", scale=4)

    with Image.open(path) as image:
        assert decode(image) == [payload]


@PAYLOADS
def test_terminal_text_fits_80_columns_and_decodes(payload: str) -> None:
    text = qr_text(payload)
    lines = text.splitlines()

    assert max(len(line) for line in lines) <= TERMINAL_COLUMNS
    assert len({len(line) for line in lines}) == 1
    # The default is for light-on-dark terminals: the quiet zone is drawn as full blocks.
    assert set(lines[0]) == {"\u2588"}
    assert decode(render_half_blocks(text, lit_is_dark=False)) == [payload]


def test_terminal_text_for_dark_on_light_terminals_decodes() -> None:
    text = qr_text(PAIR_PAYLOAD, light_on_dark=False)

    assert set(text.splitlines()[0]) == {" "}
    assert decode(render_half_blocks(text, lit_is_dark=True)) == [PAIR_PAYLOAD]


def test_terminal_text_refuses_payloads_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match="too long"):
        qr_text("x" * 1000)


@PAYLOADS
def test_svg_is_valid_xml_with_an_svg_root(tmp_path: Path, payload: str) -> None:
    path = save_svg(payload, tmp_path / "pair.svg")

    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(root.attrib["width"]) > 0


def test_png_scale_sets_pixels_per_module(tmp_path: Path) -> None:
    small = save_png(PAIR_PAYLOAD, tmp_path / "s.png", scale=2)
    large = save_png(PAIR_PAYLOAD, tmp_path / "l.png", scale=6)

    with Image.open(small) as s, Image.open(large) as big:
        assert big.width == 3 * s.width
        # Quiet zone included: the first pixel column is light.
        assert s.convert("L").getpixel((QUIET_ZONE, QUIET_ZONE)) == 255


def test_empty_payload_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        save_png("", tmp_path / "x.png")


def render_half_blocks(text: str, *, lit_is_dark: bool, scale: int = 4) -> Image.Image:
    """Turn terminal half blocks back into pixels, as a phone camera would see them."""
    halves = {" ": (False, False), "\u2580": (True, False), "\u2584": (False, True)}
    halves["\u2588"] = (True, True)
    rows: list[list[bool]] = []
    for line in text.splitlines():
        upper, lower = zip(*(halves[ch] for ch in line), strict=True)
        rows.extend([list(upper), list(lower)])
    width, height = len(rows[0]), len(rows)
    image = Image.new("L", (width * scale, height * scale), 255)
    for y, row in enumerate(rows):
        for x, lit in enumerate(row):
            if lit == lit_is_dark:
                image.paste(0, (x * scale, y * scale, (x + 1) * scale, (y + 1) * scale))
    return image
