"""Capture (cameras, renders, box) and import (mesh, colours, material, images) in real Blender."""
import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]


@pytest.fixture()
def capture():
    from fit_implicit.blender_addon import capture
    return capture


@pytest.fixture()
def importer():
    from fit_implicit.blender_addon import importer
    return importer


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _scene_with_plane_in_upper_half():
    """Camera at +5 Z looking down; a grey emitter (scene-linear 0.2140 = sRGB 0.5) covers the
    upper part of the image, the world behind is visible (transparent in captures)."""
    scene = fresh_scene(width=32, height=24, samples=4)
    cam = add_camera(scene, lens=50.0)
    grey = emission_material("Grey", (0.2140, 0.2140, 0.2140))
    add_plane(scene, "Top", size=1.2, location=(0.0, 0.55, 0.0), material=grey)
    return scene, cam


def test_render_is_rgba_mask_top_row_first(tmp_path, capture):
    scene, cam = _scene_with_plane_in_upper_half()
    images = capture.render_views(scene, [cam], str(tmp_path))
    assert images.shape == (1, 24, 32, 4) and images.dtype == np.uint8
    img = images[0]
    alpha = img[..., 3]
    # The plane is in the upper part of the view: the top rows are covered, the bottom ones not.
    assert (alpha[4:10, 12:20] == 255).all(), alpha
    assert (alpha[-6:, :] == 0).all(), alpha
    assert (alpha[:, :2] == 0).all()            # left and right of the plane: background
    # 'Standard' view transform: PNG values are the plain sRGB encoding of the emitted colour.
    rgb = img[4:10, 12:20, :3].astype(int)
    assert np.abs(rgb - 128).max() <= 2, rgb


def test_render_settings_are_restored(tmp_path, capture):
    scene, cam = _scene_with_plane_in_upper_half()
    other = add_camera(scene, "Other", location=(0, 0, 9))
    scene.camera = other
    r = scene.render
    r.film_transparent = False
    r.image_settings.file_format = "JPEG"
    r.filepath = "//keep_me_"
    before = (scene.view_settings.view_transform, scene.view_settings.look, r.film_transparent,
              r.image_settings.file_format, r.filepath, scene.camera.name, r.use_compositing)
    capture.render_views(scene, [cam], str(tmp_path))
    after = (scene.view_settings.view_transform, scene.view_settings.look, r.film_transparent,
             r.image_settings.file_format, r.filepath, scene.camera.name, r.use_compositing)
    assert after == before
    assert before[0] != "Standard"

    # ... and also when something goes wrong in the middle.
    with pytest.raises(RuntimeError, match="boom"):
        with capture.CaptureRenderSettings(scene):
            assert scene.view_settings.view_transform == "Standard" and r.film_transparent
            raise RuntimeError("boom")
    assert (scene.view_settings.view_transform, r.film_transparent, r.image_settings.file_format) == \
        (before[0], False, "JPEG")


def test_load_png_matches_file_bytes(tmp_path, capture):
    # A PNG written by Blender is read back byte for byte, top row first.
    import bpy
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    img = bpy.data.images.new("src", 7, 5, alpha=True)
    img.pixels.foreach_set((rgba[::-1].astype(np.float32) / 255).ravel())
    path = str(tmp_path / "x.png")
    img.filepath_raw, img.file_format = path, "PNG"
    img.save()
    back = capture.load_png_rgba(path)
    assert back.shape == (5, 7, 4)
    # PNG stores straight alpha: colour is only defined where alpha > 0.
    assert np.array_equal(back[..., 3], rgba[..., 3])
    visible = rgba[..., 3] > 0
    assert np.abs(back[visible].astype(int) - rgba[visible].astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------
# Cameras and box
# --------------------------------------------------------------------------------------------
def test_ring_cameras_look_at_bbox_centre(capture):
    import bpy
    from fit_implicit.shared import cameras
    scene = fresh_scene(width=64, height=48)
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(3.0, -1.0, 0.5))
    ob = bpy.context.object
    ob.scale = (1.0, 0.8, 0.9)
    bpy.context.view_layer.update()
    ob.select_set(True)
    plan = capture.plan_capture(scene, bpy.context.view_layer, ring_count=8)
    assert plan.created_ring and len(plan.cameras) == 8
    assert all(c.users_collection[0].name == capture.CAMERA_COLLECTION for c in plan.cameras)
    bbox = capture.world_bbox([ob], bpy.context.evaluated_depsgraph_get())
    centre = bbox.mean(axis=0)
    corners = np.array([[x, y, z] for x in bbox[:, 0] for y in bbox[:, 1] for z in bbox[:, 2]])
    for k, pose in zip(plan.intrinsics, plan.poses):
        uv, depth = cameras.project(centre[None], k, pose)
        assert depth[0] > 0
        assert np.allclose(uv[0], [32.0, 24.0], atol=1e-6)      # the image centre
        uv, depth = cameras.project(corners, k, pose)           # the whole box is in view
        assert (depth > 0).all() and (uv >= 0).all() and (uv[:, 0] <= 64).all() and (uv[:, 1] <= 48).all()
        # ... and fills it: a corner reaches past 60 % of the narrower half-side.
        assert np.abs(uv - [32.0, 24.0]).max() > 0.6 * 24
    assert plan.aabb[0].tolist() < bbox[0].tolist() and plan.aabb[1].tolist() > bbox[1].tolist()


def test_aabb_is_padded_box_of_selection(capture):
    import bpy
    scene = fresh_scene()
    add_camera(scene)
    a = add_plane(scene, "A", size=2.0, location=(0, 0, 0))
    add_plane(scene, "B", size=2.0, location=(10, 0, 0))
    a.select_set(True)
    plan = capture.plan_capture(scene, bpy.context.view_layer)
    assert np.allclose(plan.aabb, [[-1.2, -1.2, -0.2], [1.2, 1.2, 0.2]])
    a.select_set(False)          # nothing selected: every visible object
    plan = capture.plan_capture(scene, bpy.context.view_layer)
    assert np.allclose(plan.aabb, [[-1 - 1.2, -1 - 1.2, -1.2], [11 + 1.2, 1 + 1.2, 1.2]])


def test_plan_errors_are_clear(capture):
    import bpy
    scene = fresh_scene()
    add_plane(scene)
    with pytest.raises(capture.CaptureError, match="no cameras and nothing is selected"):
        capture.plan_capture(scene, bpy.context.view_layer)
    cam = add_camera(scene)
    cam.data.type = "PANO"
    with pytest.raises(capture.CaptureError, match="'Camera' is panoramic.*perspective"):
        capture.plan_capture(scene, bpy.context.view_layer)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------
def _tetra(offset):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) + np.float32(offset)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    c = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.2, 0.04045], [0.73, 0.01, 1.0]], np.float32)
    return v, f, c


def test_import_mesh_lands_in_world_with_linear_colours(importer):
    import bpy
    scene = fresh_scene()
    verts, faces, cols = _tetra((10.25, -3.5, 2.125))
    ob = importer.import_mesh(scene, verts, faces, cols)
    me = ob.data
    assert np.allclose(np.array(ob.matrix_world), np.eye(4))
    assert ob.users_collection[0].name == importer.RESULT_COLLECTION
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    assert np.array_equal(co.reshape(-1, 3), verts)             # exactly where given
    tri = np.empty(len(me.polygons) * 3, np.int32)
    me.polygons.foreach_get("vertices", tri)
    assert np.array_equal(tri.reshape(-1, 3), faces)
    attr = me.color_attributes["Col"]
    assert (attr.data_type, attr.domain) == ("FLOAT_COLOR", "POINT")
    assert me.color_attributes.active_color_name == "Col"
    got = np.empty(len(me.vertices) * 4, np.float32)
    attr.data.foreach_get("color", got)
    got = got.reshape(-1, 4)
    srgb = cols.astype(np.float64)
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    assert np.allclose(got[:, :3], linear, atol=1e-6)
    assert np.allclose(got[:, 1], [0.0, 0.2140411, 0.0331048, 0.000774], atol=1e-6)
    assert np.allclose(got[:, 3], 1.0)
    assert all(p.use_smooth for p in me.polygons)
    # The material's Base Color comes from the colour attribute.
    mat = me.materials[0]
    assert mat.name == importer.MATERIAL_NAME
    links = [(l.from_node.bl_idname, getattr(l.from_node, "layer_name", ""), l.to_node.bl_idname, l.to_socket.name)
             for l in mat.node_tree.links]
    assert ("ShaderNodeVertexColor", "Col", "ShaderNodeBsdfPrincipled", "Base Color") in links
    out = next(n for n in mat.node_tree.nodes if n.bl_idname == "ShaderNodeOutputMaterial")
    assert out.inputs["Surface"].links[0].from_node.bl_idname == "ShaderNodeBsdfPrincipled"
    assert bpy.data.objects[ob.name] == ob


def test_import_twice_without_clashes(importer):
    import bpy
    scene = fresh_scene()
    v, f, c = _tetra((0, 0, 0))
    a = importer.import_mesh(scene, v, f, c)
    b = importer.import_mesh(scene, v + 1, f, c)
    assert a.name != b.name and a.data.name != b.data.name
    assert a.data.materials[0] == b.data.materials[0]             # one shared material
    assert len(bpy.data.collections[importer.RESULT_COLLECTION].objects) == 2
    assert len([m for m in bpy.data.materials if m.name.startswith(importer.MATERIAL_NAME)]) == 1
    co = np.empty(12, np.float32)
    b.data.vertices.foreach_get("co", co)
    assert np.array_equal(co.reshape(-1, 3), v + 1)


def test_preview_image_rows_and_colour_space(importer):
    scene = fresh_scene()
    del scene
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[0] = (255, 0, 0, 255)          # top row red
    rgba[-1] = (0, 0, 255, 128)         # bottom row half-transparent blue
    img = importer.update_preview_image(rgba)
    assert img.name == importer.PREVIEW_IMAGE and tuple(img.size) == (8, 6)
    assert img.colorspace_settings.name == "sRGB" and not img.is_float
    px = np.empty(8 * 6 * 4, np.float32)
    img.pixels.foreach_get(px)
    px = px.reshape(6, 8, 4)
    assert np.allclose(px[-1, 0], (1, 0, 0, 1))       # stored bottom-up: the top row is last
    assert np.allclose(px[0, 0], (0, 0, 1, 128 / 255), atol=1e-6)
    # Updating with another size reuses the same datablock.
    img2 = importer.update_preview_image(np.full((3, 4, 4), 200, np.uint8))
    assert img2 == img and tuple(img2.size) == (4, 3)


def test_import_drops_triangles_that_repeat_a_vertex(importer):
    scene = fresh_scene()
    v, f, c = _tetra((0, 0, 0))
    ob = importer.import_mesh(scene, v, np.concatenate([f, [[1, 1, 2], [3, 0, 3]]]).astype(np.int32), c)
    assert len(ob.data.polygons) == 4 and len(ob.data.vertices) == 4
    assert not ob.data.validate()      # nothing left for Blender to fix
