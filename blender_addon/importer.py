"""Arrays -> Blender data: meshes (numpy + foreach_set), vertex-colour material, images.

Runs on the main thread only.
"""
from __future__ import annotations

import bpy
import numpy as np

RESULT_COLLECTION = "Implicit Results"
MATERIAL_NAME = "Implicit Vertex Color"
COLOR_ATTRIBUTE = "Col"
PREVIEW_IMAGE = "Implicit Preview"


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> scene-linear (IEC 61966-2-1), same shape, float32."""
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def ensure_collection(scene, name: str):
    """The collection ``name``, created if needed and linked somewhere under the scene."""
    coll = bpy.data.collections.get(name)
    if coll is None or coll.library is not None:
        coll = bpy.data.collections.new(name)
    if not any(c == coll for c in scene.collection.children_recursive):
        scene.collection.children.link(coll)
    return coll


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------
def mesh_from_arrays(name: str, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
                     *, smooth: bool = True, validate: bool = False):
    """A new Mesh datablock.

    Args:
        vertices: (V, 3) float32 positions (used as they are: world coordinates for results).
        faces: (F, 3) int triangle vertex indices.
        colors: (V, 3) float sRGB in [0, 1], or None; stored as the scene-linear FLOAT_COLOR
            point attribute ``Col`` (active and render colour).
        validate: also run Blender's full Mesh.validate() (about 1 s per million triangles);
            triangles that repeat a vertex are always dropped.
    """
    verts = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
    tris = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, 3)
    if tris.size and (tris.min() < 0 or tris.max() >= len(verts)):
        raise ValueError(f"face indices must be in [0, {len(verts)})")
    # Triangles that repeat a vertex are invalid in Blender (marching cubes can emit them).
    tris = tris[(tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])]
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(verts))
    me.vertices.foreach_set("co", verts.ravel())
    if len(tris):
        me.loops.add(tris.size)
        me.loops.foreach_set("vertex_index", tris.ravel())
        me.polygons.add(len(tris))
        me.polygons.foreach_set("loop_start", np.arange(0, tris.size, 3, dtype=np.int32))
    me.update(calc_edges=True)
    if colors is not None:
        set_point_colors(me, colors)
    if smooth and len(tris):
        if hasattr(me, "shade_smooth"):          # 4.1+
            me.shade_smooth()
        else:
            me.polygons.foreach_set("use_smooth", np.ones(len(tris), dtype=bool))
    if validate:
        me.validate(clean_customdata=False)
    return me


def set_point_colors(mesh, colors: np.ndarray, name: str = COLOR_ATTRIBUTE):
    """Store (V, 3|4) sRGB colours as a scene-linear FLOAT_COLOR point attribute ``name``."""
    c = np.asarray(colors, dtype=np.float32).reshape(len(mesh.vertices), -1 if len(mesh.vertices) else 3)
    rgba = np.ones((len(c), 4), dtype=np.float32)
    rgba[:, :3] = srgb_to_linear(c[:, :3])
    if c.shape[1] == 4:
        rgba[:, 3] = np.clip(c[:, 3], 0.0, 1.0)
    old = mesh.color_attributes.get(name)
    if old is not None:
        mesh.color_attributes.remove(old)
    attr = mesh.color_attributes.new(name, "FLOAT_COLOR", "POINT")
    attr.data.foreach_set("color", rgba.ravel())
    ca = mesh.color_attributes
    ca.active_color_name = name
    if hasattr(ca, "default_color_name"):
        ca.default_color_name = name
    for i, a in enumerate(ca):
        if a.name == name and hasattr(ca, "render_color_index"):
            ca.render_color_index = i
    return attr


# --------------------------------------------------------------------------------------------
# Material
# --------------------------------------------------------------------------------------------
def _material_reads_attribute(mat, attribute: str) -> bool:
    tree = mat.node_tree
    if tree is None:
        return False
    for link in tree.links:
        src, dst = link.from_node, link.to_node
        if (src.bl_idname == "ShaderNodeVertexColor" and getattr(src, "layer_name", "") == attribute
                and dst.bl_idname == "ShaderNodeBsdfPrincipled" and link.to_socket.name == "Base Color"):
            return True
    return False


def vertex_color_material(name: str = MATERIAL_NAME, attribute: str = COLOR_ATTRIBUTE):
    """A Principled BSDF material whose Base Color is the colour attribute ``attribute``.
    An existing material of that name wired that way is reused."""
    mat = bpy.data.materials.get(name)
    if mat is not None and mat.library is None and _material_reads_attribute(mat, attribute):
        return mat
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:          # 4.2: no node tree until use_nodes (deprecated in 5.0)
        mat.use_nodes = True
    tree = mat.node_tree
    bsdf = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"), None)
    out = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeOutputMaterial"), None)
    if bsdf is None:
        bsdf = tree.nodes.new("ShaderNodeBsdfPrincipled")
    if out is None:
        out = tree.nodes.new("ShaderNodeOutputMaterial")
    if not out.inputs["Surface"].is_linked:
        tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    col = tree.nodes.new("ShaderNodeVertexColor")
    col.layer_name = attribute
    col.location = (bsdf.location.x - 300.0, bsdf.location.y)
    tree.links.new(col.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    return mat


# --------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------
def import_mesh(scene, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None, *,
                name: str = "Implicit Mesh", collection: str = RESULT_COLLECTION, smooth: bool = True):
    """A new object at the identity transform (``vertices`` are world coordinates), with the
    vertex-colour material, in the collection ``collection`` of ``scene``."""
    me = mesh_from_arrays(name, vertices, faces, colors, smooth=smooth)
    me.materials.append(vertex_color_material())
    ob = bpy.data.objects.new(name, me)
    ob.matrix_world.identity()
    ensure_collection(scene, collection).objects.link(ob)
    return ob


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def image_from_rgba(name: str, rgba: np.ndarray, image=None):
    """Create (or update in place) a byte Image from (h, w, 4) uint8 sRGB RGBA, top row first.

    The image is marked 'sRGB' on purpose: byte pixels hold the encoded values as they are.
    """
    arr = np.asarray(rgba)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3|4) uint8 array, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    if image is None:
        image = bpy.data.images.get(name)
    if image is not None and (image.is_float or image.library is not None or image.source != "GENERATED"):
        image = None
    if image is None:
        image = bpy.data.images.new(name, w, h, alpha=True, float_buffer=False)
    # Colour space first: changing it regenerates a generated image's buffer.
    if image.colorspace_settings.name != "sRGB":
        image.colorspace_settings.name = "sRGB"
    if image.alpha_mode != "STRAIGHT":
        image.alpha_mode = "STRAIGHT"
    if tuple(image.size) != (w, h):
        image.generated_width, image.generated_height = w, h
    px = np.ones((h, w, 4), dtype=np.float32)
    px[..., : arr.shape[2]] = arr.astype(np.float32) / 255.0
    image.pixels.foreach_set(np.ascontiguousarray(px[::-1]).ravel())
    image.update()
    return image


def update_preview_image(rgba: np.ndarray, name: str = PREVIEW_IMAGE):
    """Write a training preview into the Image ``name`` (created on first use)."""
    return image_from_rgba(name, rgba)
