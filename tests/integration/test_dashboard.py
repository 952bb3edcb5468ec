"""The dashboard, rendered by a real headless Chromium from a running `replicator mirror`.

Two looks at the same page: `--dump-dom` after its scripts ran (the row's text and the
chart's series), and a screenshot decoded here (not blank; the row's state badge and the
chart series' colour are on screen).
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.harness import caught_up, wait_for
from tests.integration.test_mirror_basic import start_mirror

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium (apt-get install chromium)")
STREAMING = (0x2E, 0x7D, 0x32)   # .s-streaming in dashboard.html
FIRST_SERIES = (0x1F, 0x6F, 0xEB)  # COLOURS[0] in dashboard.html
BUDGET_MS = 4000                 # virtual time: the page polls /status a few times


def chromium(url: str, *how: str) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,800",
             f"--virtual-time-budget={BUDGET_MS}", *how, url],
            capture_output=True, timeout=90, check=True)


def png_pixels(path: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decodes an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, pixels = bytearray(stride), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        pixels.extend(tuple(line[x:x + 3]) for x in range(0, stride, bpp))  # type: ignore[misc]
        prev = line
    return width, height, pixels


def test_dashboard_shows_the_row_and_the_chart(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("one")
    mirror, status = start_mirror(tmp_path, src, dst)
    page = status.removesuffix("status")
    try:
        wait_for(lambda: caught_up(status), 30, message="the mirror to catch up")

        dom = chromium(page, "--dump-dom").stdout.decode()
        row = re.search(r'<tr data-key="local/mirror">(.*?)</tr>', dom)
        assert row, dom[:2000]
        cells = re.findall(r"<td[^>]*>(?:<span[^>]*>)?([^<]*)", row.group(1))
        assert cells[:6] == ["local", "mirror", "streaming", "1", "1", "1"], cells
        assert cells[8] == "0 ms", "replay lag"
        series = re.search(r'<path class="series" data-key="local/mirror" '
                           r'data-points="(\d+)" d="([^"]*)"', dom)
        assert series and int(series.group(1)) >= 2, "the chart has a line of several polls"
        assert series.group(2).startswith("M")

        shot = tmp_path / "dashboard.png"
        chromium(page, f"--screenshot={shot}")
        width, height, pixels = png_pixels(shot)
        assert (width, height) == (1200, 800)
        colours = Counter(pixels)
        assert len(colours) > 50, "the screenshot is not blank"
        assert colours[STREAMING] > 300, "the row's streaming badge is on screen"
        assert colours[FIRST_SERIES] > 50, "the chart's series (legend swatch) is on screen"
    finally:
        assert mirror.stop() == 0, mirror.log()
