"""Arrays -> Blender data: meshes (numpy + foreach_set), vertex-colour or textured PBR
materials, images.

Textured meshes arrive split at UV seams (one UV per vertex, see shared.protocol.MeshResult):
vertices with equal positions are welded back, the UVs go to the loops of a UV layer, so the
object is one connected surface with UV seams, as an artist would make it.

Runs on the main thread only.
"""
from __future__ import annotations

import bpy
import numpy as np

from ._shared import color

RESULT_COLLECTION = "Implicit Results"
MATERIAL_NAME = "Implicit Vertex Color"
COLOR_ATTRIBUTE = "Col"
PREVIEW_IMAGE = "Implicit Preview"
UV_LAYER = "UVMap"
# Texture kind -> (Principled BSDF input it feeds, colour space of its image).
TEXTURE_INPUTS = {"albedo": ("Base Color", "sRGB"), "normal": ("Normal", "Non-Color"),
                  "roughness": ("Roughness", "Non-Color"), "metallic": ("Metallic", "Non-Color")}


def ensure_collection(scene, name: str):
    """The collection ``name``, created if needed and linked somewhere under the scene."""
    coll = bpy.data.collections.get(name)
    if coll is None or coll.library is not None:
        coll = bpy.data.collections.new(name)
    if not any(c == coll for c in scene.collection.children_recursive):
        scene.collection.children.link(coll)
    return coll


# --------------------------------------------------------------------------------------------
# The asset: where its origin is, what it says about itself
# --------------------------------------------------------------------------------------------
ASSET_PREFIX = "implicit_"      # custom properties of an imported asset start with this


def place_origin(ob, point) -> None:
    """Put the object's origin at ``point`` (world) without moving its surface: the mesh data
    shifts by -point and the object moves by +point (a result's mesh arrives in world
    coordinates, so its origin would sit at the world origin)."""
    from mathutils import Matrix, Vector

    p = Vector([float(c) for c in point])
    ob.data.transform(Matrix.Translation(-p), shape_keys=True)
    ob.matrix_world = Matrix.Translation(p) @ ob.matrix_world
    ob.data.update()


def tag_asset(ob, facts: dict) -> None:
    """Store ``facts`` on the object as custom properties ``implicit_<name>`` (numbers, text and
    lists of numbers as they are; anything else as text), so the asset says how it was made."""
    for key, value in facts.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float | str) or (
                isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)):
            ob[ASSET_PREFIX + key] = value
        else:
            ob[ASSET_PREFIX + key] = str(value)


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
    rgba[:, :3] = color.srgb_to_linear(c[:, :3])
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


def _principled_material(name: str):
    """A new material ``name`` whose output is fed by a Principled BSDF: (material, node tree, BSDF)."""
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
    return mat, tree, bsdf


def vertex_color_material(name: str = MATERIAL_NAME, attribute: str = COLOR_ATTRIBUTE):
    """A Principled BSDF material whose Base Color is the colour attribute ``attribute``.
    An existing material of that name wired that way is reused."""
    mat = bpy.data.materials.get(name)
    if mat is not None and mat.library is None and _material_reads_attribute(mat, attribute):
        return mat
    mat, tree, bsdf = _principled_material(name)
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
                name: str = "Implicit Mesh", collection: str = RESULT_COLLECTION, smooth: bool = True,
                uvs: np.ndarray | None = None, textures: dict | None = None, shape_keys: list | None = None):
    """A new object at the identity transform (``vertices`` are world coordinates), in the
    collection ``collection`` of ``scene``.

    With ``uvs`` (V, 2) (v up) and ``textures`` (kind -> (H, W, C) uint8 image, top row first;
    kinds "albedo", "normal", "roughness"), the mesh is welded at its UV seams, gets the UV layer
    ``UVMap`` and a Principled BSDF material fed by those images (:func:`textured_material`);
    otherwise the vertex-colour material.  ``shape_keys``: (name, (V, 3) world positions) pairs,
    added after a "Basis" key (the vertices), unkeyed, at value 0.
    """
    keep = None
    if uvs is not None and len(uvs) and textures:
        verts, tris, loop_uvs, keep = weld_seams(vertices, faces, uvs)
        me = mesh_from_arrays(name, verts, tris, None if colors is None else np.asarray(colors)[keep],
                              smooth=smooth)
        set_loop_uvs(me, tris, loop_uvs)
        me.materials.append(textured_material(f"{name} Material", textures))
    else:
        me = mesh_from_arrays(name, vertices, faces, colors, smooth=smooth)
        me.materials.append(vertex_color_material())
    ob = bpy.data.objects.new(name, me)
    ob.matrix_world.identity()
    ensure_collection(scene, collection).objects.link(ob)
    if shape_keys:
        ob.shape_key_add(name="Basis", from_mix=False)
        for key_name, positions in shape_keys:
            positions = np.asarray(positions, np.float32).reshape(-1, 3)
            key = ob.shape_key_add(name=key_name, from_mix=False)
            key.data.foreach_set("co", np.ascontiguousarray(positions if keep is None else positions[keep]).ravel())
        me.update()
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


# --------------------------------------------------------------------------------------------
# UV textures
# --------------------------------------------------------------------------------------------
def weld_seams(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray):
    """Undo the split at UV seams.

    Args:
        vertices (V, 3) float, faces (F, 3) int, uvs (V, 2) float: one UV per (split) vertex.
    Returns:
        welded vertices (W, 3) float32; faces (F', 3) int32 into them (triangles that repeat a
        welded vertex dropped); loop UVs (F', 3, 2) float32; keep (W,) int64, for each welded
        vertex one of the input vertices it came from (to carry per-vertex data over).
    """
    verts = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
    tris = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    uv = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
    if len(uv) != len(verts):
        raise ValueError(f"expected one UV per vertex, got {len(uv)} for {len(verts)} vertices")
    if tris.size and (tris.min() < 0 or tris.max() >= len(verts)):
        raise ValueError(f"face indices must be in [0, {len(verts)})")
    welded, keep, inverse = np.unique(verts, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    new = inverse[tris]
    ok = (new[:, 0] != new[:, 1]) & (new[:, 1] != new[:, 2]) & (new[:, 0] != new[:, 2])
    return (welded.astype(np.float32), new[ok].astype(np.int32), uv[tris[ok]].astype(np.float32),
            keep.astype(np.int64))


def set_loop_uvs(mesh, faces: np.ndarray, loop_uvs: np.ndarray, name: str = UV_LAYER):
    """Store (F, 3, 2) per-corner UVs on the UV layer ``name`` of a triangle mesh whose polygon
    i is ``faces[i]`` (as :func:`mesh_from_arrays` builds it, with no triangle dropped)."""
    if len(mesh.loops) != loop_uvs.shape[0] * 3:
        raise ValueError(f"{len(mesh.loops)} mesh corners for {loop_uvs.shape[0]} triangles of UVs")
    layer = mesh.uv_layers.get(name) or mesh.uv_layers.new(name=name)
    layer.uv.foreach_set("vector", np.ascontiguousarray(loop_uvs, dtype=np.float32).ravel())
    mesh.uv_layers.active = layer
    return layer


def texture_image(name: str, image: np.ndarray, colorspace: str):
    """A new byte Image packed into the .blend from (H, W, 1|3|4) uint8 (top row first); one
    channel is repeated into RGB.  ``colorspace``: "sRGB" (colours) or "Non-Color" (data)."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected an (h, w, 1|3|4) uint8 image, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    img = bpy.data.images.new(name, w, h, alpha=arr.shape[2] == 4, float_buffer=False)
    img.colorspace_settings.name = colorspace      # before the pixels: it regenerates the buffer
    px = np.ones((h, w, 4), dtype=np.float32)
    if arr.shape[2] == 1:
        px[..., :3] = arr.astype(np.float32) / 255.0
    else:
        px[..., : arr.shape[2]] = arr.astype(np.float32) / 255.0
    img.pixels.foreach_set(np.ascontiguousarray(px[::-1]).ravel())
    img.update()
    img.pack()                                     # kept inside the .blend: nothing lost on save
    return img


def light_image(name: str, image: np.ndarray):
    """A new float Image packed into the .blend from linear (H, W, 3) float32 radiance (top row
    first; HDR values kept: a light estimated with the materials, protocol.MaterialResult)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name}: expected an (h, w, 3) float image, got {arr.shape}")
    h, w = arr.shape[:2]
    img = bpy.data.images.new(name, w, h, alpha=False, float_buffer=True)
    img.colorspace_settings.name = "Linear Rec.709"    # before the pixels: it regenerates the buffer
    px = np.ones((h, w, 4), dtype=np.float32)
    px[..., :3] = arr
    img.pixels.foreach_set(np.ascontiguousarray(px[::-1]).ravel())
    img.update()
    img.pack()                                     # kept inside the .blend (as OpenEXR: HDR values survive)
    return img


def textured_material(name: str, textures: dict, uv_layer: str = UV_LAYER):
    """A Principled BSDF material fed by Image Texture nodes: albedo -> Base Color (sRGB),
    normal -> Normal Map node (tangent space, ``uv_layer``) -> Normal (Non-Color), roughness ->
    Roughness (Non-Color), metallic -> Metallic (Non-Color; estimated materials).  ``textures``:
    kind -> (H, W, C) uint8 image; unknown kinds raise."""
    unknown = set(textures) - set(TEXTURE_INPUTS)
    if unknown:
        raise ValueError(f"unknown texture kinds {sorted(unknown)} (known: {', '.join(TEXTURE_INPUTS)})")
    mat, tree, bsdf = _principled_material(name)
    bsdf.inputs["Roughness"].default_value = 0.8
    bsdf.inputs["Metallic"].default_value = 0.0
    for row, kind in enumerate(k for k in TEXTURE_INPUTS if k in textures):
        socket, colorspace = TEXTURE_INPUTS[kind]
        node = tree.nodes.new("ShaderNodeTexImage")
        node.name = node.label = f"Implicit {kind}"
        node.image = texture_image(f"{name} {kind}", textures[kind], colorspace)
        node.location = (bsdf.location.x - 600.0, bsdf.location.y - 300.0 * row)
        if kind == "normal":
            nmap = tree.nodes.new("ShaderNodeNormalMap")
            nmap.space = "TANGENT"
            nmap.uv_map = uv_layer
            nmap.location = (bsdf.location.x - 250.0, bsdf.location.y - 300.0 * row)
            tree.links.new(node.outputs["Color"], nmap.inputs["Color"])
            tree.links.new(nmap.outputs["Normal"], bsdf.inputs["Normal"])
        else:
            tree.links.new(node.outputs["Color"], bsdf.inputs[socket])
    return mat
