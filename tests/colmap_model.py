"""A hand-made COLMAP text model with known cameras and poses (used by test_colmap.py and
test_dataset_import_bpy.py).  The expected values are worked out by hand in the comments."""
from pathlib import Path

import numpy as np

CAMERAS_TXT = """# Camera list with one line of data per camera:
#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]
# Number of cameras: 6
1 SIMPLE_PINHOLE 64 48 50 32 24
2 PINHOLE 64 48 55 55 31.5 23.25
3 SIMPLE_RADIAL 64 48 50 32.5 24.5 -0.1
4 RADIAL 64 48 50 32 24 -0.12 0.03
5 OPENCV 64 48 50 50 33 22 -0.2 0.05 0.001 -0.002
6 OPENCV_FISHEYE 64 48 40 40 32 24 0.03 -0.01 0.002 -0.001
"""

# World-to-camera (OpenCV) of each image.  Quaternions QW QX QY QZ; the 90-degree one about x is
# (cos 45, sin 45, 0, 0): R = [[1, 0, 0], [0, 0, -1], [0, 1, 0]].
S = 0.7071067811865476
IMAGES_TXT = f"""# Image list with two lines of data per image:
#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME
#   POINTS2D[] as (X, Y, POINT3D_ID)
# Number of images: 6, mean observations per image: 1
2 1 0 0 0 0 0 5 2 b.png

1 {S} {S} 0 0 1 2 3 1 a.png
10.5 20.25 -1 3.0 4.0 7
3 0 0 0 1 0.5 -1 4 3 c.png

4 1 0 0 0 0 0 6 4 d.png

5 {S} 0 {S} 0 0 0 4 5 e.png
1 1 -1
6 1 0 0 0 0 0 3 6 f.png

"""

# Camera-to-world in Blender's convention (C = -R^T t, rotation R^T diag(1, -1, -1)):
#  a: R^T = [[1,0,0],[0,0,1],[0,-1,0]], R^T t = (1, 3, -2) -> C = (-1, -3, 2);
#     columns of R^T (1,0,0), (0,0,-1), (0,1,0) with the last two negated.
#  b: identity, t = (0, 0, 5) -> C = (0, 0, -5), rotation diag(1, -1, -1).
#  c: 180 degrees about z: R = diag(-1, -1, 1); R^T t = (-0.5, 1, 4) -> C = (0.5, -1, -4);
#     rotation diag(-1, -1, 1) diag(1, -1, -1) = diag(-1, 1, -1).
#  d: identity, C = (0, 0, -6).
#  e: 90 degrees about y: R = [[0,0,1],[0,1,0],[-1,0,0]], R^T = [[0,0,-1],[0,1,0],[1,0,0]];
#     R^T t = (-4, 0, 0) -> C = (4, 0, 0); columns (0,0,1), -(0,1,0), -(-1,0,0).
#  f: identity, C = (0, 0, -3).
EXPECTED_C2W = {
    "a": [[1, 0, 0, -1], [0, 0, -1, -3], [0, 1, 0, 2]],
    "b": [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, -5]],
    "c": [[-1, 0, 0, 0.5], [0, 1, 0, -1], [0, 0, -1, -4]],
    "d": [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, -6]],
    "e": [[0, 0, 1, 4], [0, -1, 0, 0], [1, 0, 0, 0]],
    "f": [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, -3]],
}
# (fx, fy, cx, cy), lens code, (k1, k2, k3, k4, p1, p2) per image name.
EXPECTED_CAMERA = {
    "a": ([50, 50, 32, 24], 0, [0, 0, 0, 0, 0, 0]),
    "b": ([55, 55, 31.5, 23.25], 0, [0, 0, 0, 0, 0, 0]),
    "c": ([50, 50, 32.5, 24.5], 1, [-0.1, 0, 0, 0, 0, 0]),
    "d": ([50, 50, 32, 24], 1, [-0.12, 0.03, 0, 0, 0, 0]),
    "e": ([50, 50, 33, 22], 1, [-0.2, 0.05, 0, 0, 0.001, -0.002]),
    "f": ([40, 40, 32, 24], 2, [0.03, -0.01, 0.002, -0.001, 0, 0]),
}


def expected_c2w(name: str) -> np.ndarray:
    return np.vstack([np.array(EXPECTED_C2W[name], dtype=np.float64), [0, 0, 0, 1]])


def write_model(folder: Path, images: bool = True) -> Path:
    """cameras.txt + images.txt in folder/sparse/0, and 64 x 48 PNGs in folder/images."""
    model = Path(folder) / "sparse" / "0"
    model.mkdir(parents=True, exist_ok=True)
    (model / "cameras.txt").write_text(CAMERAS_TXT)
    (model / "images.txt").write_text(IMAGES_TXT)
    if images:
        from PIL import Image
        (Path(folder) / "images").mkdir(exist_ok=True)
        for i, name in enumerate("abcdef"):
            px = np.zeros((48, 64, 3), np.uint8)
            px[..., 0], px[..., 1] = 40 * i, np.arange(64, dtype=np.uint8)[None] * 4
            Image.fromarray(px).save(Path(folder) / "images" / f"{name}.png")
    return model


# COLMAP's binary model ids of the models above (its camera_models.h order).
BINARY_MODEL_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4, "OPENCV_FISHEYE": 5}


def write_binary_model(folder: Path) -> Path:
    """The same model as cameras.bin + images.bin (COLMAP's default output), in folder/sparse/0,
    encoded here from the text above (little-endian, as COLMAP writes it)."""
    import struct
    model = Path(folder) / "sparse" / "0"
    model.mkdir(parents=True, exist_ok=True)
    cams = [ln.split() for ln in CAMERAS_TXT.splitlines() if ln and not ln.startswith("#")]
    out = struct.pack("<Q", len(cams))
    for c in cams:
        out += struct.pack("<iiQQ", int(c[0]), BINARY_MODEL_IDS[c[1]], int(c[2]), int(c[3]))
        out += struct.pack(f"<{len(c) - 4}d", *map(float, c[4:]))
    (model / "cameras.bin").write_bytes(out)
    lines = [ln for ln in IMAGES_TXT.splitlines() if not ln.startswith("#")]
    records = []
    for head, points in zip(lines[0::2], lines[1::2]):
        t = head.split()
        pts = [float(v) for v in points.split()]
        rec = struct.pack("<i7di", int(t[0]), *map(float, t[1:8]), int(t[8])) + t[9].encode() + b"\0"
        rec += struct.pack("<Q", len(pts) // 3)
        for x, y, pid in zip(pts[0::3], pts[1::3], pts[2::3]):
            rec += struct.pack("<ddq", x, y, int(pid))
        records.append(rec)
    (model / "images.bin").write_bytes(struct.pack("<Q", len(records)) + b"".join(records))
    return model


#: Sparse points of the model: (id, xyz, rgb, error) and their tracks (image id, point2D index).
POINTS = [(1, (0.5, -0.25, 2.0), (255, 0, 0), 0.4, [(1, 0), (2, 3)]),
          (7, (-1.0, 0.75, 3.5), (0, 128, 255), 1.25, [(3, 1)]),
          (9, (2.0, 2.0, -0.5), (10, 20, 30), 0.0, [])]


def write_points(model: Path, binary: bool = False) -> None:
    """points3D.txt (or .bin, little-endian as COLMAP writes it) of POINTS into the model folder."""
    import struct
    if not binary:
        lines = ["# 3D point list with one line of data per point:"]
        for pid, xyz, rgb, err, track in POINTS:
            lines.append(" ".join(map(str, [pid, *xyz, *rgb, err, *[v for pair in track for v in pair]])))
        (Path(model) / "points3D.txt").write_text("\n".join(lines) + "\n")
        return
    out = struct.pack("<Q", len(POINTS))
    for pid, xyz, rgb, err, track in POINTS:
        out += struct.pack("<Q3d3BdQ", pid, *xyz, *rgb, err, len(track))
        out += b"".join(struct.pack("<ii", *pair) for pair in track)
    (Path(model) / "points3D.bin").write_bytes(out)
