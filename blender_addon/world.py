"""The background a fit modelled, as the scene's World.

A fit of photos whose background is not transparent also models what lies outside its box
(backend/fields/background.py) and sends it as an equirectangular image
(shared.protocol.EnvironmentResult); the session keeps it as a packed image, on the fit's
Results entry and named on its asset (``implicit_environment``).  *Use Background as World*
puts that image on an Environment Texture node -> Background -> World Output in the World
"Fit Implicit Environment" (made once, then reused) and makes it the scene's World.

*Use Estimated Light as World* does the same for the light a fit estimated with its materials
(Submit.material_steps: a MaterialResult, kept as a packed float image on the entry and named on its
asset, ``implicit_light``), in the World "Fit Implicit Light": the artist sees the asset as
photographed, then changes the light.  *Use Light File as World* takes such a light from a file
(``fit-implicit mesh --materials``: ``<stem>_light.hdr``, backend/export/materials.py).

The image's columns follow the Environment Texture node's own mapping, so nothing here turns or
mirrors it (checked by rendering: tests/addon/test_environment_bpy.py).
"""
from __future__ import annotations

import os

import bpy

from .results import selected

WORLD_NAME = "Fit Implicit Environment"
LIGHT_WORLD_NAME = "Fit Implicit Light"      # the World of a light estimated with the materials (a file)
NODE_NAME = "Implicit Environment"          # the Environment Texture node of that World
ASSET_PROPERTY = "implicit_environment"     # an imported asset's custom property: its environment image's name
LIGHT_PROPERTY = "implicit_light"           # ... and its estimated light's
NO_FIT = "Select a fit in the Results list first"
NO_ENVIRONMENT = ("The selected fit has no background to use: only fits of photos without transparency "
                  "(a room, a garden, the sky around the object) model what lies outside the box")


NO_LIGHT = ("The selected fit estimated no light: set Estimate Materials (Photos) above 0 and fit photos "
            "without passes")


def environment_of(entry):
    """The environment Image of a Results entry (results.ImplicitResult): its own, else the one
    its asset names; None when the fit modelled no background (or the image is gone)."""
    return _image_of(entry, "environment", ASSET_PROPERTY)


def light_of(entry):
    """The estimated light's Image of a Results entry, as :func:`environment_of` finds the background's."""
    return _image_of(entry, "light", LIGHT_PROPERTY)


def _image_of(entry, attribute: str, asset_property: str):
    if entry is None:
        return None
    if getattr(entry, attribute) is not None:
        return getattr(entry, attribute)
    name = entry.asset.get(asset_property) if entry.asset is not None else None
    return bpy.data.images.get(name) if isinstance(name, str) else None


def use_as_world(scene, image, name: str = WORLD_NAME):
    """Make ``image`` (equirectangular) the World of ``scene`` through the World ``name``: reused
    when it exists (its Environment Texture node gets the image; the rest of its nodes, e.g. a
    changed strength, stay), else made with Environment Texture -> Background -> World Output.
    Returns the World."""
    world = bpy.data.worlds.get(name)
    if world is None or world.library is not None:
        world = bpy.data.worlds.new(name)
    if world.node_tree is None:          # 4.2: no node tree until use_nodes (deprecated in 5.0)
        world.use_nodes = True
    tree = world.node_tree
    node = tree.nodes.get(NODE_NAME)
    if node is None or node.bl_idname != "ShaderNodeTexEnvironment":
        tree.nodes.clear()
        node = tree.nodes.new("ShaderNodeTexEnvironment")
        node.name = node.label = NODE_NAME
        background = tree.nodes.new("ShaderNodeBackground")
        output = tree.nodes.new("ShaderNodeOutputWorld")
        node.location, background.location, output.location = (-350.0, 0.0), (0.0, 0.0), (250.0, 0.0)
        tree.links.new(node.outputs["Color"], background.inputs["Color"])
        tree.links.new(background.outputs["Background"], output.inputs["Surface"])
    node.projection = "EQUIRECTANGULAR"
    node.image = image
    scene.world = world
    return world


class _EntryImageAsWorld:
    """An operator that makes an image of the selected Results entry the scene's World: ``image_of``
    finds it (None: greyed out with ``missing``), in the World ``world_name``; ``what`` names it."""

    image_of = staticmethod(environment_of)
    missing, world_name, what = NO_ENVIRONMENT, WORLD_NAME, "the background of"

    @classmethod
    def poll(cls, context):
        scene = context.scene
        entry = selected(scene) if scene is not None else None
        if entry is None:
            cls.poll_message_set(NO_FIT)
            return False
        if cls.image_of(entry) is None:
            cls.poll_message_set(cls.missing)
            return False
        return True

    def execute(self, context):
        entry = selected(context.scene)
        image = self.image_of(entry)
        world = use_as_world(context.scene, image, name=self.world_name)
        self.report({"INFO"}, f"The World is now '{world.name}', {self.what} {entry.label or entry.job_id} "
                              f"({image.size[0]} x {image.size[1]})")
        return {"FINISHED"}


class IMPLICIT_OT_use_environment(_EntryImageAsWorld, bpy.types.Operator):
    """Make the background the selected fit modelled (what its photos showed around the object) the
    scene's World: its environment image on an Environment Texture node, in the World "Fit
    Implicit Environment\""""

    bl_idname = "implicit.use_environment"
    bl_label = "Use Background as World"
    bl_options = {"REGISTER", "UNDO"}


class IMPLICIT_OT_use_light(_EntryImageAsWorld, bpy.types.Operator):
    """Make the light the selected fit estimated with its materials the scene's World (in the World
    "Fit Implicit Light"): the asset looks as photographed; then change the light to relight it"""

    bl_idname = "implicit.use_light"
    bl_label = "Use Estimated Light as World"
    bl_options = {"REGISTER", "UNDO"}
    image_of = staticmethod(light_of)
    missing, world_name, what = NO_LIGHT, LIGHT_WORLD_NAME, "the light estimated by"


class IMPLICIT_OT_show_albedo(bpy.types.Operator):
    """Show a photo and the base colour estimated from the photos, as that photo's camera sees it,
    side by side in an Image Editor: what is left of the light in the material shows there"""

    bl_idname = "implicit.show_albedo"
    bl_label = "Albedo beside Photo"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        scene = context.scene
        entry = selected(scene) if scene is not None else None
        if entry is None or entry.albedo_check is None:
            cls.poll_message_set(NO_FIT if entry is None else NO_LIGHT)
            return False
        return True

    def execute(self, context):
        from .fit_session import show_in_image_editor

        image = selected(context.scene).albedo_check
        shown = show_in_image_editor(image)
        self.report({"INFO"}, f"'{image.name}': the photo (left), the estimated base colour (right)"
                              + ("" if shown else "; open it in an Image Editor"))
        return {"FINISHED"}


class IMPLICIT_OT_light_from_file(bpy.types.Operator):
    """Make a light estimated with the materials (``fit-implicit mesh --materials``: <stem>_light.hdr,
    equirectangular, linear) the scene's World, in the World "Fit Implicit Light", to see the asset
    as photographed before changing the light"""

    bl_idname = "implicit.light_from_file"
    bl_label = "Use Light File as World"
    bl_options = {"REGISTER", "UNDO"}

    filepath: bpy.props.StringProperty(subtype="FILE_PATH", options={"SKIP_SAVE"})
    filter_glob: bpy.props.StringProperty(default="*.hdr;*.exr", options={"HIDDEN"})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        path = bpy.path.abspath(self.filepath)
        if not path or not os.path.isfile(path):
            self.report({"ERROR"}, f"No light file at '{self.filepath}': pick the <stem>_light.hdr written beside the mesh")
            return {"CANCELLED"}
        try:
            image = bpy.data.images.load(path, check_existing=True)
        except RuntimeError as exc:
            self.report({"ERROR"}, f"Blender cannot read '{path}' as an image: {exc}")
            return {"CANCELLED"}
        world = use_as_world(context.scene, image, name=LIGHT_WORLD_NAME)
        self.report({"INFO"}, f"The World is now '{world.name}', the light of {os.path.basename(path)} "
                              f"({image.size[0]} x {image.size[1]})")
        return {"FINISHED"}


CLASSES = (IMPLICIT_OT_use_environment, IMPLICIT_OT_use_light, IMPLICIT_OT_show_albedo, IMPLICIT_OT_light_from_file)
