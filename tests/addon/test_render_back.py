"""Renders back (issue 5 §5): a real backend process fits a tiny field, then RenderJobs render
views of the model it saved in the fit job's folder, over real ZeroMQ; and the add-on's "Render
with Field" operator (real bpy) writes them as PNGs and an image sequence.

Bounds, and why: the fit (16 views of 32 x 32, 120 draft steps) is small, so a held-out view
scores about 25 dB on white (measured: see test output); 20 dB leaves room for CPU scheduling
differences while an empty or misplaced field scores 11-15 dB.
"""
import numpy as np
import pytest

import synthetic
from helpers import TEST_TOKEN, BackendProcess, RawPeer, make_submit
from fit_implicit.backend.fitting.metrics import psnr_white
from fit_implicit.shared import cameras, protocol

SIZE = 32
BOUND_DB = 20.0


def held_out_cameras(count=3):
    """Cameras between the training ones (other azimuths and elevations)."""
    pos = cameras.ring_positions(synthetic.CENTER, 4.2 * synthetic.SCALE, count, elevations_deg=(5.0, 35.0))
    poses = np.stack([cameras.look_at(p, synthetic.CENTER) for p in pos])
    k = cameras.intrinsics_from_fov(0.7, SIZE, SIZE)
    return np.repeat(k[None], count, 0), poses


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(backend, fit job id): a real backend (torch, CPU) that has fitted and saved a tiny field."""
    runs = tmp_path_factory.mktemp("runs")
    backend = BackendProcess(fake=False, args=["--runs-dir", str(runs), "--client-timeout", "0"], startup_timeout=60)
    try:
        with RawPeer(backend.address, token=TEST_TOKEN) as peer:
            peer.send(make_submit(n=16, size=SIZE, steps=120, mesh_resolution=16, name="render-back"))
            reply = peer.recv(timeout=30)
            assert isinstance(reply, protocol.Accepted), reply
            try:
                end = peer.recv_until(protocol.JOB_END_TYPES, timeout=900)[-1]
            except TimeoutError:
                raise AssertionError(f"the fit did not end in time:\n{backend.log()[-3000:]}") from None
            assert isinstance(end, protocol.Done), f"{end}\n{backend.log()[-3000:]}"
        assert (runs / reply.job_id / "model.pt").is_file()
        yield backend, reply.job_id
    finally:
        backend.close()


def render_job(peer, job_id, intrinsics, poses, sizes, timeout=300):
    peer.send(protocol.RenderJob(fit_job_id=job_id, intrinsics=intrinsics, poses=poses, sizes=sizes))
    first = peer.recv(timeout=30)
    if not isinstance(first, protocol.Accepted):
        return first, []
    return first, peer.recv_until(protocol.JOB_END_TYPES, timeout=timeout)


@pytest.mark.slow   # one real fit (about 20 s on 2 idle cores) shared by this module
def test_render_job_matches_the_analytic_scene(fitted):
    backend, job_id = fitted
    k, poses = held_out_cameras()
    sizes = np.array([[SIZE, SIZE], [SIZE, SIZE], [2 * SIZE, SIZE]], np.int32)   # a wide one too
    k[2] = cameras.intrinsics_from_fov(0.7, 2 * SIZE, SIZE)
    with RawPeer(backend.address, token=TEST_TOKEN) as peer:
        accepted, messages = render_job(peer, job_id, k, poses, sizes)
    assert isinstance(messages[-1], protocol.Done), messages[-1]
    renders = [m for m in messages if isinstance(m, protocol.RenderResult)]
    assert [m.index for m in renders] == [0, 1, 2] and all(m.job_id == accepted.job_id for m in renders)
    assert renders[2].image.shape == (SIZE, 2 * SIZE, 4)
    scores = [psnr_white(m.image, synthetic.render(k[i], poses[i], *sizes[i])) for i, m in enumerate(renders)]
    print("held-out PSNR of renders back:", [f"{s:.2f}" for s in scores])
    assert min(scores) > BOUND_DB, scores
    assert messages[-1].summary["views"] == 3
    assert any(isinstance(m, protocol.Progress) and m.stage == "render" for m in messages)


@pytest.mark.slow   # shares the fit
def test_render_job_errors_are_clear(fitted):
    backend, job_id = fitted
    k, poses = held_out_cameras(1)
    sizes = np.array([[8, 8]], np.int32)
    with RawPeer(backend.address, token=TEST_TOKEN) as peer:
        reply, _ = render_job(peer, "../../etc", k, poses, sizes)
        assert isinstance(reply, protocol.Error) and "not a job id" in reply.message
        reply, _ = render_job(peer, "0123456789ab", k, poses, sizes)
        assert isinstance(reply, protocol.Error) and reply.code == "unknown_job"
        assert "fit job 0123456789ab has no fitted model" in reply.message
        # The backend still serves renders after a failure.
        _, messages = render_job(peer, job_id, k, poses, sizes)
        assert isinstance(messages[-1], protocol.Done)


@pytest.mark.slow   # shares the fit
def test_a_model_kept_elsewhere_comes_back_and_is_meshed_again(fitted):
    """FetchModel gives the fitted model's files; StoreModel gives them back (after the backend's
    copy expired, or to another backend) under a new id that renders exactly as the original;
    MeshJob meshes a model again with other settings, in the scene's place."""
    backend, job_id = fitted
    k, poses = held_out_cameras(1)
    sizes = np.array([[SIZE, SIZE]], np.int32)
    with RawPeer(backend.address, token=TEST_TOKEN) as peer:
        peer.send(protocol.FetchModel(fit_job_id=job_id))
        model = peer.recv(timeout=60)
        assert isinstance(model, protocol.ModelFile) and model.fit_job_id == job_id, model
        assert model.weights[:4].tobytes() == b"PK\x03\x04" and b'"method"' in model.run_json.tobytes()
        peer.send(protocol.StoreModel(run_json=model.run_json, weights=model.weights, name="kept"))
        ack = peer.recv(timeout=60)
        assert isinstance(ack, protocol.Ack) and ack.request == "store_model" and ack.job_id != job_id, ack
        _, original = render_job(peer, job_id, k, poses, sizes)
        _, restored = render_job(peer, ack.job_id, k, poses, sizes)
        images = [[m.image for m in msgs if isinstance(m, protocol.RenderResult)] for msgs in (original, restored)]
        assert len(images[0]) == 1 and np.array_equal(images[0][0], images[1][0])
        # Meshed again, coarser and capped: vertex colours, in the scene's place, at most 300 faces.
        peer.send(protocol.MeshJob(fit_job_id=ack.job_id, mesh_resolution=24, max_faces=300))
        assert isinstance(peer.recv(timeout=30), protocol.Accepted)
        messages = peer.recv_until(protocol.JOB_END_TYPES, timeout=300)
        assert isinstance(messages[-1], protocol.Done), messages[-1]
        mesh = [m for m in messages if isinstance(m, protocol.MeshResult)][0]
        assert 50 < len(mesh.faces) <= 300 and messages[-1].summary["faces"] == len(mesh.faces)
        lo = np.min([sp.center - sp.radius for sp in synthetic.spheres()], axis=0)
        hi = np.max([sp.center + sp.radius for sp in synthetic.spheres()], axis=0)
        assert np.allclose(mesh.vertices.min(0), lo, atol=0.6) and np.allclose(mesh.vertices.max(0), hi, atol=0.6)
        # Bad requests: clear errors, and the backend goes on.
        peer.send(protocol.FetchModel(fit_job_id="0123456789ab"))
        err = peer.recv(timeout=30)
        assert isinstance(err, protocol.Error) and err.code == "unknown_job" and "has no fitted model" in err.message
        peer.send(protocol.StoreModel(run_json=np.frombuffer(b'{"format": 2}', np.uint8),
                                      weights=model.weights))
        err = peer.recv(timeout=30)
        assert isinstance(err, protocol.Error) and err.code == "bad_model" and "names no known method" in err.message
        peer.send(protocol.StoreModel(run_json=model.run_json, weights=np.frombuffer(b"\x80\x04pickle", np.uint8)))
        err = peer.recv(timeout=30)
        assert isinstance(err, protocol.Error) and err.code == "bad_model" and "not a torch archive" in err.message


@pytest.mark.parametrize("change,text", [
    (dict(sizes=np.array([[0, 8]], np.int32)), "sizes must be in"),
    (dict(poses=np.eye(4)[None] * 2), "last row"),
    (dict(intrinsics=np.array([[0.0, 10, 4, 4]])), "focal lengths must be positive"),
    (dict(sizes=np.array([[8000, 8000]] * 100, np.int32), intrinsics=np.ones((100, 4)),
          poses=np.repeat(np.eye(4)[None], 100, 0)), "in all is more than"),
    (dict(intrinsics=np.zeros((0, 4)), poses=np.zeros((0, 4, 4)), sizes=np.zeros((0, 2), np.int32)), "at least one"),
    (dict(fit_job_id="x" * 65), "longer than 64"),
])
def test_render_job_validation(change, text):
    values = dict(fit_job_id="0123456789ab", intrinsics=np.array([[10.0, 10, 4, 4]]), poses=np.eye(4)[None],
                  sizes=np.array([[8, 8]], np.int32))
    values.update(change)
    with pytest.raises(protocol.ProtocolError, match=text):
        protocol.decode_message(protocol.RenderJob(**values).to_frames())


# --------------------------------------------------------------------------------------------
# The add-on operator (real bpy, real backend)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow   # shares the fit
@pytest.mark.blender
def test_render_with_field_operator_writes_pngs_and_a_sequence(fitted, tmp_path):
    pytest.importorskip("bpy")
    import bpy

    from fit_implicit import blender_addon
    from bpy_helpers import fresh_scene
    from fit_implicit.blender_addon import dataset_io, render_back
    backend, job_id = fitted
    blender_addon.register()
    try:
        scene = fresh_scene(width=SIZE, height=SIZE)
        k, poses = held_out_cameras(3)
        cam = dataset_io.create_cameras(scene, [dataset_io.View("Shot", poses[0], k[0], SIZE, SIZE)])[0][0]
        scene.camera = cam
        # Animate the camera over frames 1..3 through the three held-out poses.
        scene.frame_start, scene.frame_end = 1, 3
        from mathutils import Matrix
        for frame, pose in enumerate(poses, start=1):
            cam.matrix_world = Matrix(pose.tolist())
            cam.keyframe_insert("location", frame=frame)
            cam.keyframe_insert("rotation_euler", frame=frame)
        scene.frame_set(1)
        scene[render_back.SCENE_JOB_KEY] = job_id          # as the Fit operator leaves it
        from fit_implicit.blender_addon import ownership
        scene[ownership.TOKEN_KEY] = TEST_TOKEN             # the token the fit was made with
        out = tmp_path / "renders"
        assert bpy.ops.implicit.render_back(address=backend.address, directory=str(out), timeout=300) == {"FINISHED"}
        assert (out / "Shot_0001.png").is_file()
        still = bpy.data.images[render_back.IMAGE_NAME]
        assert still.source == "FILE" and tuple(still.size) == (SIZE, SIZE)
        assert bpy.ops.implicit.render_back(address=backend.address, directory=str(out), animation=True,
                                            timeout=300) == {"FINISHED"}
        files = sorted(p.name for p in out.iterdir())
        assert files == ["Shot_0001.png", "Shot_0002.png", "Shot_0003.png"]
        image = bpy.data.images[render_back.IMAGE_NAME]
        assert image.source == "SEQUENCE" and bpy.path.abspath(image.filepath).endswith("Shot_0001.png")
        from PIL import Image
        for i, name in enumerate(files):
            got = np.asarray(Image.open(out / name).convert("RGBA"))
            score = psnr_white(got, synthetic.render(k[i], poses[i], SIZE, SIZE))
            assert score > BOUND_DB, (name, score)
        # No fitted field: a clear report, nothing sent.
        del scene[render_back.SCENE_JOB_KEY]
        with pytest.raises(RuntimeError, match="run Fit Implicit first"):
            bpy.ops.implicit.render_back(address=backend.address, directory=str(out))
    finally:
        blender_addon.unregister()


@pytest.mark.slow   # shares the fit
@pytest.mark.blender
def test_a_field_saved_beside_the_blend_is_given_back_and_renders(fitted, tmp_path):
    """Save Field fetches the fit's model into a folder (a run folder the command line reads
    too); Give Field Back hands it to the backend again under a new id that renders as the
    original; another .blend's token gets neither."""
    pytest.importorskip("bpy")
    import bpy

    from fit_implicit import blender_addon
    from bpy_helpers import fresh_scene
    from fit_implicit.backend.fitting.runs import load_run
    from fit_implicit.blender_addon import ownership, saved_fields
    backend, job_id = fitted
    blender_addon.register()
    try:
        scene = fresh_scene(width=SIZE, height=SIZE)
        scene[saved_fields.JOB_KEY], scene[ownership.TOKEN_KEY] = job_id, TEST_TOKEN    # as the Fit operator leaves them
        folder = tmp_path / "field"
        assert bpy.ops.implicit.save_field(address=backend.address, directory=str(folder)) == {"FINISHED"}
        assert load_run(folder, device="cpu").method == "nerf" and scene[saved_fields.FIELD_KEY] == str(folder)
        assert bpy.ops.implicit.restore_field(address=backend.address) == {"FINISHED"}
        new_id = scene[saved_fields.JOB_KEY]
        assert new_id != job_id
        k, poses = held_out_cameras(1)
        sizes = np.array([[SIZE, SIZE]], np.int32)
        with RawPeer(backend.address, token=TEST_TOKEN) as peer:
            images = [[m.image for m in render_job(peer, j, k, poses, sizes)[1] if isinstance(m, protocol.RenderResult)]
                      for j in (job_id, new_id)]
        assert np.array_equal(images[0][0], images[1][0])
        # Another file (another token) cannot fetch this fit.
        scene[ownership.TOKEN_KEY] = "c" * 32
        with pytest.raises(RuntimeError, match="has no fitted model on this backend"):
            bpy.ops.implicit.save_field(address=backend.address, directory=str(tmp_path / "stolen"), fit_job=job_id)
        assert not (tmp_path / "stolen" / "model.pt").exists()
    finally:
        blender_addon.unregister()


@pytest.mark.slow   # shares the fit
@pytest.mark.blender
def test_the_results_list_remeshes_a_fit_even_after_the_backend_lost_it(fitted, tmp_path):
    """Results: Re-mesh asks the backend for a new mesh of a past fit with the panel's mesh
    settings and imports it at the fit's asset's place; when the backend no longer knows the fit,
    its saved field is given back first; Forget (with Delete Field) removes the entry and the folder."""
    pytest.importorskip("bpy")
    import bpy

    from fit_implicit import blender_addon
    from bpy_helpers import fresh_scene
    from fit_implicit.blender_addon import ownership, results
    backend, job_id = fitted
    blender_addon.register()
    try:
        scene = fresh_scene(width=SIZE, height=SIZE)
        scene[ownership.TOKEN_KEY] = TEST_TOKEN
        results.record(scene, job_id, "Spheres", "nerf", "draft", 25.0)
        props = scene.implicit
        props.mesh_resolution, props.texture_size, props.max_faces = 24, "0", 300
        assert bpy.ops.implicit.result_remesh(address=backend.address) == {"FINISHED"}
        ob = bpy.data.objects["Spheres Remesh"]
        assert 50 < len(ob.data.polygons) <= 300 and ob["implicit_remeshed_from"] == job_id
        # The panel's button does not block Blender: the modal operator ticks a RemeshSession.
        import time
        from fit_implicit.blender_addon.preferences import connection_kwargs
        job = protocol.MeshJob(fit_job_id=job_id, mesh_resolution=24, max_faces=300, name="tick")
        session = results.RemeshSession(scene, backend.address, connection_kwargs(bpy.context), props.results[0],
                                        job, timeout=60)
        session.start()
        ticks, longest = 0, 0.0
        while True:
            t = time.monotonic()
            done = session.tick()
            longest, ticks = max(longest, time.monotonic() - t), ticks + 1
            if done:
                break
            time.sleep(0.02)
        session.close()
        assert session.object is not None and ticks > 1 and longest < 0.5, (ticks, longest, session.error)
        entry = props.results[0]
        folder = tmp_path / "field"
        assert bpy.ops.implicit.save_field(address=backend.address, fit_job=job_id, directory=str(folder)) == {"FINISHED"}
        assert entry.field_folder == str(folder)
        entry.job_id = "0123456789ab"            # as if the backend's cache had expired
        assert bpy.ops.implicit.result_remesh(address=backend.address) == {"FINISHED"}
        assert entry.job_id not in ("0123456789ab", job_id) and "Spheres Remesh.001" in bpy.data.objects
        assert bpy.ops.implicit.result_forget(delete_field=True) == {"FINISHED"}
        assert len(props.results) == 0 and not folder.exists()
    finally:
        blender_addon.unregister()


@pytest.mark.slow   # the session's tiny fit over time (conftest.py clip_fit), given back to the shared backend
@pytest.mark.blender
def test_mesh_over_time_imports_one_animated_object_that_follows_the_timeline(fitted, clip_fit):
    """Issue 17 item 3: a fit over time is meshed at every frame of its range (MeshJobs at the
    frames' instants) and comes back as one Empty holding a mesh per frame, each visible (viewport
    and render) only from its frame to the next; the timeline shows the right one.  Or as one mesh
    with a shape key a frame.  The fit is one this backend never had: its saved field is given back
    first, as for a .blend opened on another machine."""
    pytest.importorskip("bpy")
    import bpy

    from fit_implicit import blender_addon
    from bpy_helpers import fresh_scene
    from fit_implicit.blender_addon import ownership, results
    backend, still_id = fitted
    _, _, runs, clip_id = clip_fit
    blender_addon.register()
    try:
        scene = fresh_scene(width=SIZE, height=SIZE)
        scene[ownership.TOKEN_KEY] = TEST_TOKEN
        results.record(scene, clip_id, "Clip", "nerf", "draft", 20.0, time_range=(1, 5))
        scene.implicit.results[0].field_folder = str(runs / clip_id)
        scene.implicit.mesh_resolution, scene.implicit.texture_size = 24, "0"     # (job_runs.moving_submit: 24 cells)
        scene.frame_set(3)
        assert bpy.ops.implicit.result_mesh_over_time(address=backend.address, step=2) == {"FINISHED"}
        holder = bpy.data.objects["Clip Over Time"]
        meshes = sorted(holder.children, key=lambda ob: ob.name)
        assert [ob.name for ob in meshes] == ["Clip 0001", "Clip 0003", "Clip 0005"]
        assert [ob["implicit_time"] for ob in meshes] == [0.0, 0.5, 1.0]
        assert all(len(ob.data.vertices) > 20 for ob in meshes), [len(ob.data.vertices) for ob in meshes]
        for frame, shown in [(1, "Clip 0001"), (2, "Clip 0001"), (3, "Clip 0003"), (4, "Clip 0003"), (5, "Clip 0005"),
                             (9, "Clip 0005"), (-2, "Clip 0001")]:
            scene.frame_set(frame)
            visible = [ob.name for ob in meshes if not ob.hide_render and not ob.hide_viewport]
            assert visible == [shown], (frame, visible)
        # One Moving Mesh: the current frame's mesh once, followed through the frames as shape keys
        # (the backend's tracking: tests/backend/export/test_tracks.py); the timeline blends them
        scene.frame_set(3)
        assert bpy.ops.implicit.result_mesh_over_time(address=backend.address, step=2, kind="SHAPE_KEYS") == {"FINISHED"}
        ob = bpy.data.objects["Clip Moving"]
        assert ob["implicit_time"] == 0.5 and ob["implicit_track_lost"] < 0.05
        blocks = ob.data.shape_keys.key_blocks
        assert [k.name for k in blocks] == ["Basis", "Frame 0001", "Frame 0003", "Frame 0005"]

        def coords(block) -> np.ndarray:
            out = np.empty(3 * len(block.data), np.float32)
            block.data.foreach_get("co", out)
            return out.reshape(-1, 3)

        basis = coords(blocks["Basis"])
        assert len(basis) > 20
        np.testing.assert_allclose(coords(blocks["Frame 0003"]), basis, atol=1e-4)    # frame 3: the instant meshed
        # the keys' timing, whatever this short fit learnt of the motion: each frame shows its key in
        # full, the frames between blend two, the ends hold (known offsets written into the keys)
        key = {f: basis + np.float32([0.1 * f, -0.05 * f * f, 0.02]) for f in (1, 3, 5)}
        for f, positions in key.items():
            blocks[f"Frame {f:04d}"].data.foreach_set("co", positions.ravel())
        for frame, want in [(1, key[1]), (2, 0.5 * (key[1] + key[3])), (4, 0.5 * (key[3] + key[5])), (5, key[5]),
                            (9, key[5]), (-2, key[1])]:
            scene.frame_set(frame)
            shown = ob.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
            got = np.empty(3 * len(shown.vertices), np.float32)
            shown.vertices.foreach_get("co", got)
            np.testing.assert_allclose(got.reshape(-1, 3), want, atol=1e-4, err_msg=f"frame {frame}")
        # a still fit has nothing to mesh over time: the panel hides it, the backend refuses to follow
        with RawPeer(backend.address, token=TEST_TOKEN) as peer:
            peer.send(protocol.MeshJob(fit_job_id=still_id, mesh_resolution=16, track_times=np.array([0.0, 1.0])))
            peer.recv(timeout=30)
            end = peer.recv_until(protocol.JOB_END_TYPES, timeout=120)[-1]
            assert isinstance(end, protocol.Failed) and "one instant" in end.message, end
        results.record(scene, "0123456789ab", "Still", "nerf", "draft", 20.0)
        assert not bpy.ops.implicit.result_mesh_over_time.poll()
    finally:
        blender_addon.unregister()
