#!/usr/bin/env bash
# Screenshot of the kiln graph viewer, headless: runs viz/examples/view_demo.rs under Xvfb
# with Mesa's software OpenGL (eframe's glow backend), lets the viewer save its own
# screenshot (egui ViewportCommand::Screenshot), and checks the PNG is not blank.
#
#   tools/viz_screenshot.sh [OUT.png] [-- extra view_demo args]
#
# Default OUT is docs/viewer.png. Installs xvfb and Mesa with apt-get when missing.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-docs/viewer.png}"
shift || true
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
if [[ ${#EXTRA[@]} -eq 0 ]]; then
    EXTRA=(--layers 4 --select attention)
fi

# ---- dependencies ----------------------------------------------------------------------
need=()
command -v Xvfb >/dev/null || need+=(xvfb)
# Mesa software GL/EGL and the X libraries winit loads at run time.
for lib in libGL.so.1 libEGL.so.1 libxkbcommon-x11.so.0 libXcursor.so.1 libXrandr.so.2 libXi.so.6 libX11-xcb.so.1; do
    ldconfig -p | grep "$lib" >/dev/null || need+=("$lib")
done
compgen -G "/usr/lib/*/dri/*_dri.so" >/dev/null || need+=(mesa-dri)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "installing: xvfb and Mesa/X11 runtime libraries (missing: ${need[*]})"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcursor1 libxrandr2 libxi6 \
        libx11-xcb1 >/dev/null
fi

# ---- build -----------------------------------------------------------------------------
cargo build -q -p kiln-viz --features viewer --example view_demo
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/examples/view_demo"

# ---- run under Xvfb --------------------------------------------------------------------
DISPLAY_NUM=":$((90 + RANDOM % 100))"
Xvfb "$DISPLAY_NUM" -screen 0 1600x1000x24 -nolisten tcp >/tmp/kiln-xvfb.log 2>&1 &
XVFB_PID=$!
trap 'kill "$XVFB_PID" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    [[ -e "/tmp/.X11-unix/X${DISPLAY_NUM#:}" ]] && break
    sleep 0.1
done

mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
DISPLAY="$DISPLAY_NUM" LIBGL_ALWAYS_SOFTWARE=1 WINIT_UNIX_BACKEND=x11 \
    timeout 120 "$BIN" --screenshot "$OUT" "${EXTRA[@]}"
[[ -s "$OUT" ]] || { echo "error: the viewer wrote no screenshot to $OUT" >&2; exit 1; }

# ---- check it is not blank (standard-library PNG decoder) --------------------------------
python3 - "$OUT" <<'PY'
import struct, sys, zlib
from collections import Counter

path = sys.argv[1]
data = open(path, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, hdr = 8, b"", None
while pos < len(data):
    (n,) = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        hdr = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
w, h, depth, ctype = hdr[:4]
assert depth == 8 and ctype in (2, 6), f"unsupported PNG (depth {depth}, colour type {ctype})"
bpp = 4 if ctype == 6 else 3
raw = zlib.decompress(idat)
stride = w * bpp
prev = bytearray(stride)
colours = Counter()
for y in range(h):
    f = raw[y * (stride + 1)]
    line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if f == 1: line[i] = (line[i] + a) & 255
        elif f == 2: line[i] = (line[i] + b) & 255
        elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    if y % 2 == 0:  # every other row is plenty for statistics
        for x in range(0, stride, bpp * 2):
            colours[bytes(line[x:x + 3])] += 1
    prev = line
total = sum(colours.values())
background, bg_count = colours.most_common(1)[0]
non_bg = 1 - bg_count / total
# Op-class fills the viewer uses (input, param, elementwise, reduce, movement, structured).
fills = [(0xb9, 0xe0, 0xa5), (0xff, 0xe5, 0x99), (0xc6, 0xdb, 0xf5), (0xff, 0xcc, 0x99), (0xd9, 0xc6, 0xe6), (0xf4, 0xa6, 0xa6)]
fill_px = sum(colours.get(bytes(c), 0) for c in fills)
print(f"{path}: {w}x{h}, {len(colours)} distinct colours, {non_bg:.1%} non-background, "
      f"{fill_px} sampled pixels of node fills")
ok = len(colours) >= 16 and non_bg >= 0.05 and fill_px >= 200
if not ok:
    sys.exit("error: the screenshot looks blank")
print("ok: the screenshot shows a graph")
PY
ls -l "$OUT"
