"""Per-scene fit settings and the state of the running job (``scene.implicit``)."""
import bpy

from . import results
from ._shared import methods, protocol

# Names, titles and descriptions from shared/methods.py, in its order (the recommended method first).
METHOD_ITEMS = tuple((name, title, text) for name, (title, text) in methods.METHOD_INFO.items())
PRESET_ITEMS = tuple((name, title, text) for name, (title, text) in methods.PRESET_INFO.items())
ENCODING_ITEMS = tuple((name, title, text) for name, (title, text) in methods.ENCODING_INFO.items())


class ImplicitSceneSettings(bpy.types.PropertyGroup):
    # ---- settings ------------------------------------------------------------------------
    address: bpy.props.StringProperty(
        name="Address",
        description="Backend address for this scene; empty: use the add-on preferences",
        default="",
    )
    preset: bpy.props.EnumProperty(
        name="Quality", items=PRESET_ITEMS, default="standard",
        description="How long and how finely the field trains (steps, grid sizes, mesh resolution)")
    method: bpy.props.EnumProperty(
        name="Field", items=METHOD_ITEMS, default="sdf",
        description="The kind of neural field fitted to the views")
    encoding: bpy.props.EnumProperty(
        name="Encoding", items=ENCODING_ITEMS, default="hashgrid",
        description="How the field encodes positions (the backend's setting of the same name): the hash grid "
                    "is the fastest to a sharp result; the others are smooth and small")
    seconds: bpy.props.FloatProperty(
        name="Training Time",
        description="Training time budget in seconds; 0: the preset's default number of steps",
        default=0.0, min=0.0, soft_max=3600.0, unit="TIME_ABSOLUTE",
    )
    # Fit SDF to Points (blender_addon/points_fit.py): the backend's setting of the same name, and the
    # mesh's resolution as a voxel size
    points_detail: bpy.props.FloatProperty(
        name="Detail", default=0.5, min=0.0, max=1.0,
        description="Fit SDF to Points: 0 fills holes in the scan smoothly, 1 keeps every detail (finer grid levels, "
                    "no smoothing)")
    points_voxel_size: bpy.props.FloatProperty(
        name="Voxel Size", default=0.0, min=0.0, soft_max=1.0, unit="LENGTH", precision=4,
        description="Fit SDF to Points: size of the mesh's voxels in the object's own units, as Voxel Remesh "
                    "(smaller: finer mesh); 0: the quality preset's resolution")
    ring_count: bpy.props.IntProperty(
        name="Ring Cameras",
        description="Cameras placed around the selection when the scene has none",
        default=24, min=3, max=500,
    )
    mesh_resolution: bpy.props.IntProperty(
        name="Mesh Resolution",
        description="Marching cubes grid size along the longest side; 0: the preset's default",
        default=0, min=0, max=1024,
    )
    max_faces: bpy.props.IntProperty(
        name="Max Faces",
        description="Most triangles of the imported mesh: the backend decimates larger meshes (a limit under "
                    f"{protocol.MIN_FACES} is raised to {protocol.MIN_FACES}). "
                    "0: Auto, the backend's default (200,000 when textured)",
        default=0, min=0, max=protocol.MAX_VERTICES, soft_max=2_000_000,
    )
    mesh_opacity: bpy.props.FloatProperty(
        name="Surface Level",
        description="Radiance fields: the opacity a ray gains crossing one voxel where the mesh surface lies "
                    "(higher: the mesh sits deeper, past thin haze; lower: faint parts are kept). "
                    "0: Auto, chosen per field by matching the field's own renders",
        default=0.0, min=0.0, max=0.99, step=5, precision=2,
    )
    smooth_shading: bpy.props.BoolProperty(
        name="Smooth Shading", default=True,
        description="Shade the imported mesh smooth; off: flat faces")
    texture_size: bpy.props.EnumProperty(
        name="Textures",
        description="Bake UV textures (base colour, normal map, roughness) from the field at this size; "
                    "None keeps vertex colours",
        items=[("0", "None", "Vertex colours only"),
               (str(protocol.TEXTURE_AUTO), "Auto", "About one texel per pixel of the camera that sees the object most "
                                           "closely (512 to 4096 a side, from the object's size and the cameras)"),
               ("1024", "1024", ""), ("2048", "2048", ""), ("4096", "4096", "")],
        default=str(protocol.TEXTURE_AUTO))
    preview_size: bpy.props.IntProperty(
        name="Preview Size",
        description="Longest side in pixels of the live previews the backend renders while training "
                    "(also on a remote backend); 0: no previews",
        default=128, min=0, max=1024)
    show_preview: bpy.props.BoolProperty(
        name="Show Preview",
        description="Show the live preview in an Image Editor (opens a window if there is none)",
        default=True)
    rig_views: bpy.props.IntProperty(name="Rig Views", description="Cameras of the rig", default=24,
                                     min=1, max=1000)
    rig_shape: bpy.props.EnumProperty(
        name="Rig Shape", default="HEMISPHERE", description="Where the rig's cameras sit around the selection",
        items=(("HEMISPHERE", "Hemisphere", "Views from above only"),
               ("SPHERE", "Sphere", "Views from every side")))
    rig_holdout: bpy.props.FloatProperty(
        name="Held Out", description="Share of the rig's views held out for evaluation",
        default=0.1, min=0.0, max=0.9, subtype="FACTOR")
    # ---- capture (blender_addon/capture.py) ----------------------------------------------
    capture_source: bpy.props.EnumProperty(
        name="Camera Source", default="SCENE", description="Which cameras the fit renders its views from",
        items=(("SCENE", "Scene Cameras", "The scene's cameras (a ring around the selection if there are none)"),
               ("SELECTED", "Selected Cameras", "Only the selected cameras"),
               ("COLLECTION", "Collection", "Every camera of a collection"),
               ("ANIMATION", "Animated Camera", "One view per frame of the scene's frame range")))
    capture_collection: bpy.props.PointerProperty(
        type=bpy.types.Collection, name="Camera Collection",
        description="The collection whose cameras are rendered (Camera Source: Collection)")
    capture_camera: bpy.props.PointerProperty(
        type=bpy.types.Object, name="Animated Camera",
        description="The camera rendered at every frame (Camera Source: Animated Camera); empty: the scene camera",
        poll=lambda _self, ob: ob.type == "CAMERA")
    over_time: bpy.props.EnumProperty(
        name="Over Time", default="STILL",
        description="Fit one instant, or the scene's frame range as a field over time (a mesh at any frame)",
        items=(("STILL", "Still", "One instant: the current frame (an animated camera's frames are views of a "
                                  "still scene)"),
               ("EVERY_CAMERA", "Every Camera, Every Frame", "Each camera at each frame of the range (multi-view)"),
               ("IN_TURN", "One Camera a Frame", "At each frame one camera, the cameras in turn (monocular, "
                                                 "as D-NeRF's datasets)"),
               ("RANDOM", "One Random Camera a Frame", "At each frame one camera picked at random (the same "
                                                       "pick every time)")))
    render_passes: bpy.props.EnumProperty(
        name="Render Passes", default="AUTO",
        description="Also render albedo, normal, depth and roughness passes (Cycles) so that the albedo carries "
                    "no lighting and the asset gets a roughness texture",
        items=(("AUTO", "Auto", "For surface fits (SDF, occupancy)"), ("ON", "On", "Always"), ("OFF", "Off", "Never")))
    # Photo captures (shared/methods.py; Submit fields of the same names)
    background: bpy.props.EnumProperty(
        name="Background", default="auto",
        description="Model what lies outside the box (walls, sky) as a coarse field of its own, so it does not "
                    "end up in the object's mesh; it comes back as an image for the World",
        items=(("auto", "Auto", "For photos without alpha, or a camera inside the box"),
               ("on", "On", "Always"), ("off", "Off", "Never: rays that leave the box see nothing")))
    camera_refine: bpy.props.EnumProperty(
        name="Refine Cameras", default="off",
        description="Correct each photo's pose while fitting (poses from COLMAP or a phone are close, not exact); "
                    "the refined cameras come back beside the originals. Not for forward-facing captures",
        items=(("off", "Off", "Take the poses as exact"), ("on", "On", "Refine each photo's pose"),
               ("focal", "Poses and Focal Length", "Refine each photo's pose and the lens's focal length (one for "
                                                   "all photos, as when the EXIF focal length is a little off)")))
    appearance: bpy.props.BoolProperty(
        name="Per-photo Exposure", default=False,
        description="Learn each photo's exposure and white balance, so that photos shot with different settings "
                    "do not leave blotches in the colours")
    material_steps: bpy.props.IntProperty(
        name="Estimate Materials", default=0, min=0, max=100_000, soft_max=5000,
        description="Photos without passes: estimate base colour, roughness, metallic and the light that lit "
                    "them, this many steps after the mesh (0: off, the colours keep the photos' lighting). The "
                    "light comes back as an image for the World, so the asset can be relit")
    resume_renders: bpy.props.BoolProperty(
        name="Resume Renders", default=True,
        description="Keep rendered views in a cache and reuse those whose camera and scene did not change "
                    "(Clear Cache deletes them)")

    # ---- job state (written by the running fit, read by the panel) ------------------------
    status: bpy.props.StringProperty(name="Status", default="", description="What the fit is doing, or how it ended")
    progress: bpy.props.FloatProperty(name="Progress", default=0.0, min=0.0, max=1.0, subtype="FACTOR",
                                      description="Share of the current stage done")
    step: bpy.props.IntProperty(name="Step", default=0, min=0, description="Training steps done")
    loss: bpy.props.FloatProperty(name="Loss", default=0.0, precision=5,
                                  description="Training loss at the last step (lower is better)")
    psnr: bpy.props.FloatProperty(name="PSNR", default=0.0, precision=2,
                                  description="How closely the field matches the views, in dB (higher is better)")
    elapsed: bpy.props.FloatProperty(name="Elapsed", default=0.0, min=0.0, unit="TIME_ABSOLUTE",
                                     description="Training time so far")
    eta: bpy.props.FloatProperty(name="ETA", default=0.0, min=0.0, unit="TIME_ABSOLUTE",
                                 description="Estimated training time left")
    total_steps: bpy.props.IntProperty(name="Total Steps", default=0, min=0,
                                       description="Training steps of the whole fit")
    running: bpy.props.BoolProperty(name="Running", default=False, description="A fit is running in this scene")
    note: bpy.props.StringProperty(name="Note", default="",
                                   description="What the backend said about this fit (e.g. how long it takes, "
                                               "or that its checkpoints cannot be written)")

    # ---- the fits of this file (blender_addon/results.py) ------------------------------------
    results: bpy.props.CollectionProperty(type=results.ImplicitResult, name="Fits",
                                          description="The fits of this file, newest last")
    results_index: bpy.props.IntProperty(name="Selected Fit", default=-1, description="The fit the buttons act on")


@bpy.app.handlers.persistent
def _reset_job_state(*_args):
    """A file saved while a fit ran must not open as "running": no session survives a load."""
    for scene in bpy.data.scenes:
        props = getattr(scene, "implicit", None)
        if props is not None and props.running:
            props.running = False
            props.status = "Interrupted (the file was saved while a fit was running)"


def register_properties():
    bpy.types.Scene.implicit = bpy.props.PointerProperty(type=ImplicitSceneSettings)
    bpy.app.handlers.load_post.append(_reset_job_state)


def unregister_properties():
    if _reset_job_state in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_reset_job_state)
    del bpy.types.Scene.implicit
