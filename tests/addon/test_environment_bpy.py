"""The background a fit modelled, as the scene's World (blender_addon/world.py): a fit whose job
sends an EnvironmentResult leaves a packed image on its asset and Results entry, and *Use
Background as World* puts it on the World.  Rendered with Cycles from the world's origin, each
camera sees the colour that shared.protocol.EnvironmentResult's mapping gives its direction: the
mapping the backend draws (backend/fields/background.py) is Blender's own."""
import math

import numpy as np
import pytest
from PIL import Image

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy
from helpers import Replay

pytestmark = [requires_bpy, pytest.mark.blender]

ADDRESS = "tcp://127.0.0.1:1"
# sRGB colour of the directions nearest each axis: (axis, sign) -> colour.
AXIS_COLOURS = {(0, 1): (255, 0, 0), (0, -1): (0, 255, 255), (1, 1): (0, 255, 0), (1, -1): (255, 0, 255),
                (2, 1): (0, 0, 255), (2, -1): (255, 255, 0)}


def axis_image(height: int) -> np.ndarray:
    """(height, 2 height, 3) uint8 equirectangular image, each pixel the AXIS_COLOURS colour of
    the axis nearest its direction, by EnvironmentResult's mapping: row i at elevation
    pi/2 - pi (i + 0.5) / H, column j at azimuth atan2(y, x) = pi - 2 pi (j + 0.5) / W."""
    h, w = height, 2 * height
    elevation = math.pi / 2 - math.pi * (np.arange(h) + 0.5) / h
    azimuth = math.pi - 2 * math.pi * (np.arange(w) + 0.5) / w
    elevation, azimuth = np.meshgrid(elevation, azimuth, indexing="ij")
    d = np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], -1)
    axis = np.abs(d).argmax(-1)
    sign = np.sign(np.take_along_axis(d, axis[..., None], -1)[..., 0]).astype(int)
    image = np.zeros((h, w, 3), np.uint8)
    for (a, s), colour in AXIS_COLOURS.items():
        image[(axis == a) & (sign == s)] = colour
    return image


def job_with_background(protocol, environment: np.ndarray) -> list:
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) + np.float32(5)
    return [[protocol.Accepted(job_id="env1")],
            [protocol.MeshResult(job_id="env1", vertices=v, faces=np.array([[0, 1, 2]], np.int32),
                                 colors=np.full((3, 3), 0.5, np.float32))],
            [protocol.EnvironmentResult(job_id="env1", image=environment)],
            [protocol.Done(job_id="env1", summary={"steps": 10, "environment_height": environment.shape[0],
                                                   "environment_width": environment.shape[1]})]]


def render_from_origin(scene, direction) -> np.ndarray:
    """(8, 8, 3) uint8: what a camera at the origin looking along ``direction`` (Z up) renders."""
    import bpy
    from mathutils import Vector

    cam = scene.objects.get("Look") or add_camera(scene, "Look", location=(0.0, 0.0, 0.0))
    cam.rotation_euler = Vector(direction).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam
    bpy.context.view_layer.update()
    scene.render.filepath = bpy.app.tempdir + "look.png"
    bpy.ops.render.render(write_still=True)
    return np.asarray(Image.open(scene.render.filepath).convert("RGB"))


@pytest.fixture()
def modules(addon):
    from fit_implicit.blender_addon import fit_session, results, world
    from fit_implicit.shared import protocol
    return fit_session, results, world, protocol


def test_the_background_becomes_the_world_and_each_direction_sees_its_colour(modules):
    import bpy

    fs, results, world, protocol = modules
    scene = fresh_scene(width=8, height=8, samples=1)
    add_plane(scene, "Object", size=1.0, material=emission_material("Grey", (0.5, 0.5, 0.5)))
    add_camera(scene, "Cam", location=(0, -4, 4), rotation=(0.785398, 0, 0))
    environment = axis_image(32)
    r = fs.fit_scene(scene, ADDRESS, client_factory=lambda a: Replay(a, job_with_background(protocol, environment), "env1"),
                     probe=lambda a: protocol.Welcome(), name="Room", cameras=["Cam"], check_asset=False)

    # The image: packed, sRGB, named after the asset, the pixels as sent; recorded on the asset and the fit.
    image = r.environment_image
    assert r.object.name == "Room Mesh" and image.name == "Room Mesh Environment"
    assert image.packed_file is not None and image.colorspace_settings.name == "sRGB"
    assert tuple(image.size) == (64, 32)
    pixels = np.empty(64 * 32 * 4, np.float32)
    image.pixels.foreach_get(pixels)
    np.testing.assert_array_equal(np.round(pixels.reshape(32, 64, 4)[::-1, :, :3] * 255), environment)
    assert r.object[world.ASSET_PROPERTY] == image.name
    assert results.selected(scene).environment == image
    assert "Use Background as World" in r.message

    # One click: the World "Fit Implicit Environment", made once and reused (the user's strength kept).
    assert bpy.ops.implicit.use_environment() == {"FINISHED"}
    made = scene.world
    assert made.name == world.WORLD_NAME
    node = made.node_tree.nodes[world.NODE_NAME]
    assert node.image == image and node.projection == "EQUIRECTANGULAR"
    background = node.outputs["Color"].links[0].to_node
    assert background.bl_idname == "ShaderNodeBackground"
    assert background.outputs["Background"].links[0].to_node.bl_idname == "ShaderNodeOutputWorld"
    background.inputs["Strength"].default_value = 1.0      # an artist's edit (the default value, for the renders)
    scene.world = bpy.data.worlds.new("Other")
    assert bpy.ops.implicit.use_environment() == {"FINISHED"}
    assert scene.world == made and len([w for w in bpy.data.worlds if w.name.startswith(world.WORLD_NAME)]) == 1

    # Rendered: a camera at the origin sees the colour of the axis it looks along, in every pixel.
    for ob in scene.objects:
        ob.hide_render = ob.type != "CAMERA"
    scene.view_settings.view_transform = "Standard"     # pixels = the image's sRGB values
    scene.render.dither_intensity = 0.0
    scene.render.use_persistent_data = True              # 8 renders in about 2 s instead of 16
    for axis, sign in AXIS_COLOURS:
        direction = [0.0, 0.0, 0.0]
        direction[axis] = float(sign)
        seen = render_from_origin(scene, direction)
        assert (np.abs(seen.astype(int) - AXIS_COLOURS[axis, sign]) <= 2).all(), (direction, seen[4, 4])
    # Looking along +X+Y (Z up): +Y is on the image's left, +X on its right.
    seen = render_from_origin(scene, (1.0, 1.0, 0.0))
    assert seen[4, 0].tolist() == [0, 255, 0] and seen[4, 7].tolist() == [255, 0, 0]


def test_a_fit_without_background_greys_the_button_out_and_says_why(modules):
    import bpy

    fs, results, world, protocol = modules
    scene = fresh_scene()
    assert not bpy.ops.implicit.use_environment.poll()
    with pytest.raises(RuntimeError, match="Select a fit in the Results list first"):
        bpy.ops.implicit.use_environment()
    asset = bpy.data.objects.new("Asset", None)
    results.record(scene, "plain", "Plain", "nerf", "draft", 20.0, asset=asset)
    assert not bpy.ops.implicit.use_environment.poll()
    with pytest.raises(RuntimeError, match="has no background to use"):
        bpy.ops.implicit.use_environment()
    assert scene.world is None or scene.world.name != world.WORLD_NAME
    # An asset that names its environment image is enough (e.g. a Results entry made before it was kept there).
    image = bpy.data.images.new("Plain Environment", 8, 4)
    asset[world.ASSET_PROPERTY] = image.name
    assert bpy.ops.implicit.use_environment.poll()
    assert bpy.ops.implicit.use_environment() == {"FINISHED"}
    assert scene.world.node_tree.nodes[world.NODE_NAME].image == image


def test_a_light_file_estimated_with_the_materials_becomes_the_world(modules, tmp_path):
    """fit-implicit mesh --materials writes <stem>_light.hdr (linear radiance); *Use Light File as
    World* lights the scene with it: a camera inside sees its radiance."""
    import bpy
    from fit_implicit.backend.export.materials import write_hdr

    fs, results, world, protocol = modules
    scene = fresh_scene(width=8, height=8, samples=1)
    light = np.zeros((8, 16, 3), np.float32)
    light[..., 0] = 0.5                                     # a red sky, linear radiance 0.5
    write_hdr(tmp_path / "mug_light.hdr", light)
    assert bpy.ops.implicit.light_from_file(filepath=str(tmp_path / "mug_light.hdr")) == {"FINISHED"}
    made = scene.world
    assert made.name == world.LIGHT_WORLD_NAME
    node = made.node_tree.nodes[world.NODE_NAME]
    assert node.image.filepath.endswith("mug_light.hdr") and node.image.is_float
    scene.view_settings.view_transform = "Standard"
    scene.render.dither_intensity = 0.0
    seen = render_from_origin(scene, (1.0, 0.0, 0.0))
    # linear 0.5 in sRGB: 188
    assert (np.abs(seen.astype(int) - [188, 0, 0]) <= 3).all(), seen[4, 4]
    with pytest.raises(RuntimeError, match="No light file at"):
        bpy.ops.implicit.light_from_file(filepath=str(tmp_path / "missing.hdr"))


def test_estimated_materials_land_on_the_asset_and_their_light_becomes_the_world(modules):
    """A fit with Estimate Materials (Submit.material_steps): the setting reaches the Submit; the
    metallic texture feeds the material's Metallic (Non-Color); the MaterialResult's light becomes
    a packed float image (HDR values kept) on the asset and the Results entry, which says the
    material was estimated; its albedo view lands beside the photo it shows (*Albedo beside
    Photo*); *Use Estimated Light as World* lights the scene with it (a camera inside sees its
    radiance)."""
    import bpy

    fs, results, world, protocol = modules
    from fit_implicit.blender_addon import panels
    scene = fresh_scene(width=8, height=8, samples=1)
    add_plane(scene, "Object", size=1.0, material=emission_material("Grey", (0.5, 0.5, 0.5)))
    add_camera(scene, "Cam", location=(0, -4, 4), rotation=(0.785398, 0, 0))
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) + np.float32(5)
    light = np.zeros((8, 16, 3), np.float32)
    light[..., 0] = 0.5                                     # a red sky, linear radiance 0.5 ...
    light[0, 0] = 40.0                                      # ... and a sun far above 1
    metallic = np.full((16, 16, 1), 200, np.uint8)
    view = np.zeros((8, 8, 4), np.uint8)
    view[2:6, 2:6] = (200, 100, 50, 255)                    # the base colour where the camera sees the mesh
    job = [[protocol.Accepted(job_id="mat1")],
           [protocol.TextureResult(job_id="mat1", kind="albedo", image=np.full((16, 16, 3), 90, np.uint8),
                                   lighting_baked=False),
            protocol.TextureResult(job_id="mat1", kind="metallic", image=metallic, lighting_baked=False)],
           [protocol.MeshResult(job_id="mat1", vertices=v, faces=np.array([[0, 1, 2]], np.int32),
                                colors=np.full((3, 3), 0.5, np.float32),
                                uvs=np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]], np.float32))],
           [protocol.MaterialResult(job_id="mat1", light=light, albedo_view=view, view_photo=0)],
           [protocol.Done(job_id="mat1", summary={"steps": 10, "material": "estimated", "material_steps": 300})]]
    replay = []

    def client(address):
        replay.append(Replay(address, job, "mat1"))
        return replay[0]

    r = fs.fit_scene(scene, ADDRESS, client_factory=client, probe=lambda a: protocol.Welcome(), name="Mug",
                     cameras=["Cam"], check_asset=False, texture_size=16, material_steps=300)
    assert r.status == "done", r.message
    assert replay[0].submit.material_steps == 300 and replay[0].submit.texture_size == 16

    tree = r.object.active_material.node_tree
    bsdf = next(n for n in tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled")
    feed = bsdf.inputs["Metallic"].links[0].from_node
    assert feed.bl_idname == "ShaderNodeTexImage" and feed.image.colorspace_settings.name == "Non-Color"

    image = r.light_image
    assert image.name == "Mug Mesh Light" and image.is_float and image.packed_file is not None
    pixels = np.empty(16 * 8 * 4, np.float32)
    image.pixels.foreach_get(pixels)
    np.testing.assert_allclose(pixels.reshape(8, 16, 4)[::-1, :, :3], light, rtol=1e-6)
    entry = results.selected(scene)
    assert entry.light == image and entry.material == "estimated"
    assert r.object[world.LIGHT_PROPERTY] == image.name and r.object["implicit_material"] == "estimated"
    assert "relightable" in panels.MATERIAL_TEXT[entry.material]
    check = entry.albedo_check
    assert check is not None and tuple(check.size) == (16, 8)
    pixels = np.empty(16 * 8 * 4, np.float32)
    check.pixels.foreach_get(pixels)
    side = np.round(pixels.reshape(8, 16, 4)[::-1, :, :3] * 255)
    photo = r.images[0].astype(np.float32) / 255.0           # the view the session sent, over mid grey
    np.testing.assert_allclose(side[:, :8], np.round((photo[..., :3] * photo[..., 3:] + 0.5 * (1 - photo[..., 3:])) * 255),
                               atol=1)
    assert side[3, 11].tolist() == [200, 100, 50] and side[0, 8].tolist() == [128, 128, 128]
    assert bpy.ops.implicit.show_albedo() == {"FINISHED"}

    assert bpy.ops.implicit.use_light() == {"FINISHED"}
    assert scene.world.name == world.LIGHT_WORLD_NAME
    assert scene.world.node_tree.nodes[world.NODE_NAME].image == image
    for ob in scene.objects:
        ob.hide_render = ob.type != "CAMERA"
    scene.view_settings.view_transform = "Standard"
    scene.render.dither_intensity = 0.0
    seen = render_from_origin(scene, (1.0, 0.0, 0.0))       # the horizon: linear 0.5 red, sRGB 188
    assert (np.abs(seen.astype(int) - [188, 0, 0]) <= 3).all(), seen[4, 4]

    # A fit without an estimated light: the button is greyed out and says how to get one.
    results.record(scene, "plain", "Plain", "nerf", "draft", 20.0, asset=bpy.data.objects.new("Plain", None))
    assert not bpy.ops.implicit.use_light.poll()
    with pytest.raises(RuntimeError, match="set Estimate Materials"):
        bpy.ops.implicit.use_light()
