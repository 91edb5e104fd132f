"""``fit-implicit fit | render | mesh`` end to end, as the benchmarks call them."""
import json
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import synthetic
from mesh_files import read_glb, read_ply

from helpers import REPO as ROOT


def backend(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fit_implicit.backend", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"zmq", "bpy"}, "fit/render/mesh must not need pyzmq or bpy"
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = synthetic.write_transforms(root / "data", count=12, size=32).parent
    out = backend("fit", data, "--out", root / "run", "--preset", "draft", "--steps", 120,
                  "--device", "cpu", "--holdout", 4, "--set", "target_samples=8192", "--set", "occupancy_warmup=32")
    return root, out


@pytest.mark.slow   # shares the ~20 s fit fixture
def test_fit_prints_progress_and_held_out_psnr(run):
    root, out = run
    assert re.search(r"^step \d+/120 ", out, re.M)
    found = re.search(r"held-out PSNR ([\d.]+) dB, SSIM ([\d.]+) over 3 views", out)
    psnr, ssim = float(found.group(1)), float(found.group(2))
    assert psnr > 15.0                                # 120 steps on 9 tiny views: well past empty (~11 dB)
    assert 0.3 < ssim <= 1.0
    assert len(re.findall(r"^  view \d/3 r_\d+: [\d.]+ dB, SSIM", out, re.M)) == 3      # progress per view
    doc = json.loads((root / "run" / "run.json").read_text())
    assert doc["meta"]["steps"] == 120 and doc["meta"]["width"] == 32
    assert abs(doc["meta"]["holdout_psnr"] - psnr) < 0.01 and abs(doc["meta"]["holdout_ssim"] - ssim) < 1e-4
    # Where it came from: the command, the dataset and its digest, versions, device.
    prov = doc["meta"]["provenance"]
    assert prov["command"][1:3] == ["fit", str(root / "data")] and prov["dataset"] == str((root / "data").resolve())
    assert len(prov["dataset_sha256"]) == 64 and prov["torch"] and prov["device"] == "cpu"
    assert not (root / "run" / "fit_args.json").exists() and not (root / "run" / "checkpoint.pt").exists()
    assert np.allclose(doc["aabb"], synthetic.aabb())
    assert (root / "run" / "model.pt").is_file()


@pytest.mark.slow   # one more ~20 s fit, beside the shared fixture's
def test_a_fit_over_two_processes_matches_one_process(run):
    """``fit --gpus 2`` on the CPU (two gloo processes, fitting/distributed.py): the same total
    batch split in two and the gradients averaged gives a field as good as one process's, within
    1.5 dB held out (different rays are drawn, so not the same bits), saved once by rank 0."""
    root, out = run
    single = json.loads((root / "run" / "run.json").read_text())["meta"]
    text = backend("fit", root / "data", "--out", root / "run2", "--preset", "draft", "--steps", 120, "--device", "cpu",
                   "--holdout", 4, "--set", "target_samples=8192", "--set", "occupancy_warmup=32", "--gpus", 2)
    assert "data-parallel: 2 processes (on the CPU)" in text
    meta = json.loads((root / "run2" / "run.json").read_text())["meta"]
    assert meta["processes"] == 2 and meta["steps"] == 120
    assert abs(meta["holdout_psnr"] - single["holdout_psnr"]) < 1.5, (meta["holdout_psnr"], single["holdout_psnr"])
    assert meta["holdout_psnr"] > 15.0


@pytest.mark.slow   # shares the ~20 s fit fixture
def test_render_names_sizes_and_alpha(run):
    root, _ = run
    cams = json.loads((root / "data" / "transforms.json").read_text())
    frames = cams["frames"]
    k = synthetic.camera_rig(1, 24)[0][0]
    doc = {"camera_angle_x": cams["camera_angle_x"], "frames": [
        {**frames[0], "file_path": "./elsewhere/r_100"},                               # no image: run's size
        {**frames[1], "file_path": "novel/cam_a.png", "w": 24, "h": 20},               # declared size
        {**frames[2], "file_path": "./images/r_2", "fl_x": k[0], "cx": 12.0, "cy": 10.0,
         "w": 24, "h": 20},                                                          # per-frame intrinsics
        {**frames[3]},                                                                  # existing image: its size
    ]}
    (root / "data" / "novel.json").write_text(json.dumps(doc))
    backend("render", root / "run", "--cameras", root / "data" / "novel.json", "--out", root / "renders")
    sizes = {p.name: Image.open(p).size for p in (root / "renders").iterdir()}
    assert sizes == {"r_100.png": (32, 32), "cam_a.png": (24, 20), "r_2.png": (24, 20), "r_3.png": (32, 32)}
    img = np.asarray(Image.open(root / "renders" / "r_3.png"))
    assert img.shape == (32, 32, 4) and img.dtype == np.uint8
    gt = np.asarray(Image.open(root / "data" / "images" / "r_3.png"))
    # alpha is the field's opacity: transparent corners, opaque where the spheres are
    assert img[0, 0, 3] < 30 and img[..., 3][gt[..., 3] == 255].mean() > 200
    # The same view as a float .exr (linear light, premultiplied): it encodes back to the PNG.
    from fit_implicit.backend.render.image import exr_to_rgba8, read_exr
    backend("render", root / "run", "--cameras", root / "data" / "novel.json", "--out", root / "exr", "--format", "exr")
    linear = read_exr(root / "exr" / "r_3.exr")
    assert linear.shape == (32, 32, 4) and linear.dtype == np.float32
    assert np.abs(exr_to_rgba8(linear).astype(int) - img.astype(int)).max() <= 1


@pytest.mark.parametrize("suffix, reader", [(".ply", read_ply), (".glb", read_glb)])
@pytest.mark.slow   # shares the ~20 s fit fixture
def test_mesh_files_in_world_frame(run, suffix, reader):
    root, _ = run
    out = root / f"mesh{suffix}"
    backend("mesh", root / "run", "--out", out, "--mesh-resolution", 48, "--texture-size", 0)   # vertex colours
    verts, faces, colors = reader(out)
    assert len(faces) > 100 and faces.max() < len(verts)
    lo = np.min([s.center - s.radius for s in synthetic.spheres()], axis=0)
    hi = np.max([s.center + s.radius for s in synthetic.spheres()], axis=0)
    assert np.allclose(verts.min(0), lo, atol=0.6) and np.allclose(verts.max(0), hi, atol=0.6)


@pytest.mark.slow   # shares the ~20 s fit fixture
def test_mesh_with_materials_estimated_from_the_photos(run):
    """--materials: the textures come from the photos' estimate (base colour, roughness, metallic in
    the glTF material) and the light is written beside the mesh (export/materials.py)."""
    from fit_implicit.backend.export.materials import MaterialConfig, environment_rows, read_hdr

    root, _ = run
    out = backend("mesh", root / "run", "--out", root / "lit.glb", "--mesh-resolution", 32, "--texture-size", 64,
                  "--materials", 30, "--data", root / "data")
    assert "materials: 30 steps" in out and "light:" in out, out
    data = (root / "lit.glb").read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)
    pbr = json.loads(data[20:20 + length])["materials"][0]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 1.0 and "metallicRoughnessTexture" in pbr     # metallic from the texture
    light = read_hdr(root / "lit_light.hdr")
    rows = environment_rows(MaterialConfig().light_rows)      # the bins upsampled, the sun drawn in
    assert light.shape == (rows, 2 * rows, 3) and np.isfinite(light).all()
    assert (light >= 0).all() and light.max() > 0
    with pytest.raises(AssertionError, match="--materials needs --data"):
        backend("mesh", root / "run", "--out", root / "x.glb", "--mesh-resolution", 32, "--texture-size", 64,
                "--materials", 10)


@pytest.mark.slow   # shares the ~20 s fit fixture
def test_mesh_opacity_option(run):
    """``--mesh-opacity`` takes a level or "auto"; a level denser than the field has anywhere leaves no
    surface, said so; a bad value is refused by name."""
    root, _ = run
    backend("mesh", root / "run", "--out", root / "auto.ply", "--mesh-resolution", 32, "--texture-size", 0, "--mesh-opacity", "auto")
    assert len(read_ply(root / "auto.ply")[1]) > 100
    for value, message in (("0.999", "no surface above the iso-level"), ("1.5", "--mesh-opacity"), ("dense", "--mesh-opacity")):
        proc = subprocess.run([sys.executable, "-m", "fit_implicit.backend", "mesh", root / "run", "--out", root / "x.ply",
                               "--mesh-resolution", "32", "--texture-size", "0", "--mesh-opacity", value],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (value, proc.stderr[-500:])


def test_help_shows_the_defaults():
    text = _cli("mesh", "--help").stdout
    assert "(default: auto)" in text and "(default: 0)" in text          # --texture-size, --mesh-resolution


def test_bad_input_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fit_implicit.backend", "fit", tmp_path, "--out", tmp_path / "run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "transforms" in proc.stderr


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fit_implicit.backend", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow   # shares the ~20 s fit fixture
def test_a_run_is_never_overwritten_silently_and_eval_scores_a_test_split(run):
    root, _ = run
    data = root / "data"
    proc = _cli("fit", data, "--out", root / "run", "--preset", "draft", "--steps", 5, "--device", "cpu")
    assert proc.returncode == 2 and "already holds a run: pass --overwrite" in proc.stderr, proc.stderr[-500:]
    assert json.loads((root / "run" / "run.json").read_text())["meta"]["steps"] == 120      # untouched
    # eval: the dataset's own cameras rendered and scored, each view reported, eval.json written.
    out = backend("eval", root / "run", "--cameras", data / "transforms.json", "--renders", root / "eval")
    assert len(re.findall(r"^  view \d+/12 ", out, re.M)) == 12
    doc = json.loads((root / "run" / "eval.json").read_text())
    assert doc["views"] == 12 and len(doc["per_view"]) == 12 and doc["psnr"] > 15.0 and 0.3 < doc["ssim"] <= 1.0
    assert len(list((root / "eval").glob("*.png"))) == 12
    # A time limit stops it and says so.
    out = backend("eval", root / "run", "--cameras", data / "transforms.json", "--seconds", 1e-6)
    assert "evaluation stopped by its 1e-06 s budget after 1 of 12 views" in out


@pytest.mark.slow   # shares the ~20 s fit fixture
def test_eval_scores_photos_of_different_sizes(run):
    """The same scene shot at 32x32, 40x24 (landscape) and 20x36 (portrait): eval renders each at
    its own size and scores it (issue 13)."""
    root, _ = run
    data = synthetic.write_transforms(root / "mixed", count=12, sizes=[(32, 32), (40, 24), (20, 36)])
    out = backend("eval", root / "run", "--cameras", data, "--renders", root / "mixed_eval")
    doc = json.loads((root / "run" / "eval.json").read_text())
    assert doc["views"] == 12 and doc["psnr"] > 15.0, out
    by_size = {}
    for path in sorted((root / "mixed_eval").glob("*.png")):
        by_size.setdefault(Image.open(path).size, []).append(path)
    assert sorted(by_size) == [(20, 36), (32, 32), (40, 24)] and all(len(v) == 4 for v in by_size.values())
    # Every view well above an empty render (~11 dB), whatever its size (measured: square 21.6-28.8,
    # portrait 24.6-26.0, landscape 18.2-22.3 dB: its pixels are finer than the fit's 32x32 views).
    psnr = {v["name"]: v["psnr"] for v in doc["per_view"]}
    assert min(psnr.values()) > 16.0, psnr


def test_budget_cut_warning_typed_settings_and_resume_after_a_kill(tmp_path):
    import signal
    import time

    data = synthetic.write_transforms(tmp_path / "data", count=6, size=16).parent
    # A budget that stops the preset's steps early says so.
    out = backend("fit", data, "--out", tmp_path / "short", "--preset", "draft", "--seconds", 0.5, "--device", "cpu",
                  "--set", "occupancy_warmup=8")
    assert re.search(r"warning: the 0.5 s budget stopped the fit at step \d+ of the draft preset's 400", out), out
    # A mistyped boolean is an error, not False.
    proc = _cli("fit", data, "--out", tmp_path / "x", "--steps", 5, "--device", "cpu", "--set", "tf32=maybe")
    assert proc.returncode == 2 and "'maybe' is not a valid bool (true/false" in proc.stderr, proc.stderr[-500:]
    # Killed mid-fit (kill -9), then --resume carries on from the last checkpoint with the same settings.
    args = [sys.executable, "-m", "fit_implicit.backend", "fit", str(data), "--out", str(tmp_path / "long"),
            "--preset", "draft", "--steps", "100000", "--device", "cpu", "--checkpoint-every", "0.2",
            "--set", "occupancy_warmup=8"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "long" / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "long" / "checkpoint.pt").exists()
    proc = _cli("fit", data, "--out", tmp_path / "long", "--device", "cpu")
    assert proc.returncode == 2 and "interrupted fit (carry on with --resume)" in proc.stderr
    import torch

    saved = json.loads((tmp_path / "long" / "fit_args.json").read_text())
    at = int(torch.load(tmp_path / "long" / "checkpoint.pt", weights_only=True)["step"])
    saved["steps"] = at + 30     # (the test shortens the interrupted fit to 30 steps past its checkpoint, to end soon)
    (tmp_path / "long" / "fit_args.json").write_text(json.dumps(saved))
    out = backend("fit", "--resume", data, "--out", tmp_path / "long", "--device", "cpu")
    resumed = int(re.search(r"resuming at step (\d+)", out).group(1))
    assert resumed == at > 0
    doc = json.loads((tmp_path / "long" / "run.json").read_text())
    assert doc["meta"]["resumed_from_step"] == resumed and doc["meta"]["steps"] == at + 30
