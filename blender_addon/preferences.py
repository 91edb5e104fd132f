"""Add-on preferences: where the backend listens."""
import bpy

DEFAULT_ADDRESS = "tcp://127.0.0.1:5599"


class ImplicitPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    address: bpy.props.StringProperty(
        name="Backend Address",
        description="ZeroMQ address of the fitting backend (start it with: python -m backend serve)",
        default=DEFAULT_ADDRESS,
    )

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "address")
        layout.label(text="Start the backend with:  python -m backend serve --bind " + self.address)


def backend_address(context, scene=None) -> str:
    """The address to use: the scene's override if set, else the preferences, else the default."""
    scene = scene if scene is not None else getattr(context, "scene", None)
    override = getattr(getattr(scene, "implicit", None), "address", "") if scene is not None else ""
    if override.strip():
        return override.strip()
    addon = context.preferences.addons.get(__package__) if context is not None else None
    if addon is not None and addon.preferences is not None and addon.preferences.address.strip():
        return addon.preferences.address.strip()
    return DEFAULT_ADDRESS
