"""Render passes for supervision (shared/protocol.py, Submit): albedo, world normals, z-depth and roughness
from Cycles.

The beauty render (capture.render_view) stays as it is; while :class:`PassOutput` is active,
the compositor also writes four single-layer float EXRs through a File Output node fed by the
Render Layers node (Blender 5.0: ``scene.compositing_node_group``; 4.x: ``scene.node_tree``).
The compositor's Viewer does not exist in background mode, so files are the way out.

Cycles has no roughness pass, so :class:`PassOutput` adds a shader AOV to the view layer and,
into every material, a few nodes writing (roughness, 1, 0) to it: the roughness feeding the
first BSDF found upstream of the active Material Output (:func:`material_bsdf`).  Nor has it a
base colour pass: its "Diffuse Color" pass is the diffuse closure's weight, which for a Principled
BSDF is the base colour times what the specular layer above it leaves (below), so an asset whose
base colour is that pass, shaded again by a Principled BSDF, comes out darker by that share twice
(the still life in Cycles: 3.5-5 % darker than the truth under either light, docs/benchmarks.md).
A second AOV carries the same BSDF's base colour times (1 - metallic) (1 - transmission), the
diffuse part of the colour without the specular layer's attenuation; the albedo pass is that
where the roughness AOV says the pixel's material wrote it, the Diffuse Color pass elsewhere.
All of it (AOVs, nodes, links) is removed again on exit.

What Cycles gives (checked with bpy 5.0.1, see tests/addon/test_passes_bpy.py):
- "Diffuse Color": linear, averaged over the pixel's samples, so multiplied by the coverage
  (alpha); for a Principled BSDF it is the base colour times the share left by the specular
  layer (about 0.96 head-on, less at grazing angles); for a Diffuse BSDF it is the colour.
- "Normal": WORLD-space shading normals, averaged over samples (length = coverage).
- "Depth": distance along the camera's viewing axis (not along the ray), from one sample
  (not averaged), 1e10 where no surface was hit.
- An AOV (a Render Layers output named after it): averaged over the pixel's samples, samples
  that hit nothing or a material without an AOV node counting 0; so the roughness AOV's G is
  the share of samples with a value (= alpha where the whole pixel has one), R / G their mean
  roughness, and the base colour AOV over that G their mean base colour (both AOVs are written
  by the same materials).
Main thread only.
"""
from __future__ import annotations

import glob
import os

import bpy
import numpy as np

from ._shared import color, protocol

PASS_NAMES = protocol.PASS_NAMES
# pass -> (Render Layers output, File Output item type); "roughness" reads the AOV's output,
# whose name is only known once the AOV exists (see PassOutput.__enter__).
_SOCKETS = {"albedo": ("Diffuse Color", "RGBA"), "normal": ("Normal", "VECTOR"), "depth": ("Depth", "FLOAT")}
_SOCKET_ALIASES = {"Diffuse Color": ("DiffCol",)}     # Blender 4.2's Render Layers names it so
_LAYER_FLAGS = ("use_pass_diffuse_color", "use_pass_normal", "use_pass_z")
NO_SURFACE_DEPTH = 1e9        # Cycles writes 1e10 where a pixel's sample hit nothing
ROUGHNESS_AOV = "ImplicitRoughness"   # the view layer AOV the materials write (roughness, 1, 0) into
BASE_COLOUR_AOV = "ImplicitBaseColor"  # ... and the one they write their diffuse base colour into
BASE_COLOUR_ITEM = "basecolor"         # its File Output item (not a Submit pass: it becomes "albedo")
# BSDFs whose "Roughness" input is the roughness; a Diffuse BSDF counts as fully rough (1.0).
# Blender 4.0+ creates the Glossy BSDF as ShaderNodeBsdfAnisotropic.
_ROUGHNESS_BSDFS = ("ShaderNodeBsdfPrincipled", "ShaderNodeBsdfAnisotropic", "ShaderNodeBsdfGlossy",
                    "ShaderNodeBsdfMetallic")
_FULLY_ROUGH_BSDFS = ("ShaderNodeBsdfDiffuse",)
# A BSDF's diffuse colour input; the others (Glossy, Anisotropic, Metallic) have no diffuse part
# (their Diffuse Color pass is 0, and so is what the base colour AOV gets from them).
_BASE_COLOUR_INPUTS = {"ShaderNodeBsdfPrincipled": "Base Color", "ShaderNodeBsdfDiffuse": "Color"}
# A Principled BSDF's inputs whose weight takes from the diffuse part (5.0 / 4.x names first).
_NOT_DIFFUSE_INPUTS = (("Metallic",), ("Transmission Weight", "Transmission"))


class PassError(Exception):
    """The passes could not be rendered or read; the text says why."""


def _compositor_tree_attr(scene) -> str:
    return "compositing_node_group" if hasattr(scene, "compositing_node_group") else "node_tree"


def _linked_output(socket):
    """The output socket feeding an input ``socket`` through an enabled, valid link, or None."""
    if socket is None or not socket.is_linked:
        return None
    link = socket.links[0]
    if link.is_muted or not link.is_valid:
        return None
    return link.from_socket


def _shader_source(socket):
    """The output socket that really feeds a shader input: reroutes and muted nodes' pass-throughs
    followed; None if nothing does."""
    for _ in range(256):                        # a bound, in case of a broken (cyclic) tree
        src = _linked_output(socket)
        if src is None:
            return None
        node = src.node
        if node.bl_idname == "NodeReroute":
            socket = node.inputs[0]
        elif node.mute:
            socket = next((il.from_socket for il in node.internal_links if il.to_socket == src), None)
        else:
            return src
    return None


def _shader_bsdf(socket, depth: int = 0):
    """See :func:`material_bsdf`; ``socket``: a shader input."""
    src = _shader_source(socket)
    if src is None or depth > 64:
        return None
    node = src.node
    if node.bl_idname in _ROUGHNESS_BSDFS or node.bl_idname in _FULLY_ROUGH_BSDFS:
        return node
    if node.bl_idname == "ShaderNodeMixShader":
        fac = node.inputs[0]
        branches = [node.inputs[1], node.inputs[2]]
        if not fac.is_linked and fac.default_value > 0.5:    # the second shader weighs more
            branches.reverse()
    elif node.bl_idname == "ShaderNodeAddShader":
        branches = [node.inputs[0], node.inputs[1]]
    else:
        return None                             # e.g. Emission, Holdout, a node group
    for branch in branches:
        found = _shader_bsdf(branch, depth + 1)
        if found is not None:
            return found
    return None


def material_bsdf(tree):
    """The BSDF node whose roughness and base colour a material's passes show: the first one
    upstream of the active (Cycles) Material Output's Surface input, through Mix Shader (the
    heavier shader first when the factor is not linked), Add Shader, reroutes and muted nodes; a
    Principled, Diffuse, Glossy, Anisotropic or Metallic BSDF, or None when there is no such
    BSDF (e.g. an Emission-only material, or one inside a node group)."""
    out = tree.get_output_node("CYCLES") if hasattr(tree, "get_output_node") else None
    if out is None or "Surface" not in out.inputs:
        return None
    return _shader_bsdf(out.inputs["Surface"])


def material_roughness(tree):
    """The roughness of :func:`material_bsdf`: a float (an unlinked "Roughness"; 1.0 for a
    Diffuse BSDF), the output socket linked into that "Roughness" input, or None (no BSDF)."""
    return _bsdf_roughness(material_bsdf(tree))


def _bsdf_roughness(node):
    if node is None:
        return None
    if node.bl_idname in _FULLY_ROUGH_BSDFS:
        return 1.0
    rough = node.inputs["Roughness"]
    linked = _linked_output(rough)
    return linked if linked is not None else float(rough.default_value)


def _input(node, names: tuple[str, ...]):
    return next((node.inputs[n] for n in names if n in node.inputs), None)


def _base_colour_output(tree, node, added: list):
    """An output socket giving ``node``'s diffuse base colour, linear RGB: the BSDF's colour
    input times (1 - metallic) (1 - transmission) for a Principled BSDF, black for a BSDF
    without a diffuse part.  The nodes it adds to ``tree`` are appended to ``added``."""
    def new(kind: str, operation: str):
        n = tree.nodes.new(kind)
        n.operation = operation
        added.append(n)
        return n

    scale = new("ShaderNodeVectorMath", "SCALE")
    colour_input = node.inputs.get(_BASE_COLOUR_INPUTS.get(node.bl_idname, ""))
    colour_src = None if colour_input is None else _linked_output(colour_input)
    if colour_src is not None:
        tree.links.new(colour_src, scale.inputs[0])
    else:
        scale.inputs[0].default_value = (0.0, 0.0, 0.0) if colour_input is None else tuple(colour_input.default_value)[:3]
    factor = 1.0                                   # a float, or an output socket
    if node.bl_idname == "ShaderNodeBsdfPrincipled":
        for names in _NOT_DIFFUSE_INPUTS:
            weight = _input(node, names)
            if weight is None:
                continue
            src = _linked_output(weight)
            if src is None:
                left = 1.0 - float(weight.default_value)
            else:
                left = new("ShaderNodeMath", "SUBTRACT")
                left.inputs[0].default_value = 1.0
                tree.links.new(src, left.inputs[1])
                left = left.outputs[0]
            if isinstance(factor, float) and isinstance(left, float):
                factor *= left
                continue
            both = new("ShaderNodeMath", "MULTIPLY")
            for slot, value in zip(both.inputs, (factor, left)):
                if isinstance(value, float):
                    slot.default_value = value
                else:
                    tree.links.new(value, slot)
            factor = both.outputs[0]
    if isinstance(factor, float):
        scale.inputs["Scale"].default_value = factor
    else:
        tree.links.new(factor, scale.inputs["Scale"])
    return scale.outputs["Vector"]


def _uses_nodes(mat) -> bool:
    """Whether Cycles shades ``mat`` with its node tree (5.0: always, if it has one)."""
    if mat.node_tree is None or not getattr(mat, "is_editable", True):
        return False
    return bpy.app.version >= (5, 0, 0) or bool(mat.use_nodes)


class PassOutput:
    """Context manager: while active, every render of ``scene`` also writes the passes as EXRs
    into ``folder`` (see :meth:`prepare` and :meth:`read`).  Everything it changes (view layer
    pass flags and the roughness AOV, compositing switch, the compositor tree, the nodes added
    to materials) is put back on exit, also when an error is raised inside the context."""

    def __init__(self, scene, view_layer, folder: str):
        self.scene, self.view_layer, self.folder = scene, view_layer, folder
        self._saved: list = []
        self._tree = None
        self._node = None
        self._items: list[str] = []            # File Output items, in order (pass names)
        self._aov_names: list[str] = []        # the AOVs we added to the view layer (roughness, base colour)
        self._aov_index = -1                   # the view layer's active AOV index before that
        self._material_nodes: list = []        # (material, node name) we added

    def _set(self, owner, attr, value):
        self._saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def __enter__(self):
        s = self.scene
        try:
            if s.render.engine != "CYCLES":
                raise PassError(f"Render passes need the Cycles engine (the scene uses {s.render.engine}).")
            for flag in _LAYER_FLAGS:
                self._set(self.view_layer, flag, True)
            sockets = dict(_SOCKETS)
            rough_aov, colour_aov = self._add_material_aovs()
            sockets["roughness"] = (rough_aov, "RGBA")
            sockets[BASE_COLOUR_ITEM] = (colour_aov, "RGBA")
            self._set(s.render, "use_compositing", True)
            attr = _compositor_tree_attr(s)
            if attr == "node_tree":            # Blender 4.x: the scene owns its compositor tree
                self._set(s, "use_nodes", True)
                tree = s.node_tree
            else:
                tree = bpy.data.node_groups.new("Implicit Passes", "CompositorNodeTree")
                self._tree = tree
                self._set(s, attr, tree)
            rl = tree.nodes.new("CompositorNodeRLayers")
            rl.scene, rl.layer = s, self.view_layer.name
            out = tree.nodes.new("CompositorNodeOutputFile")
            self._nodes = [rl, out]
            self._node = out
            fmt = out.format
            if hasattr(fmt, "media_type"):
                fmt.media_type = "IMAGE"
            fmt.file_format = "OPEN_EXR"
            fmt.color_depth = "32"
            fmt.exr_codec = "ZIP"
            self._items = list(sockets)
            for name, (socket, kind) in list(sockets.items()):
                found = [n for n in (socket, *_SOCKET_ALIASES.get(socket, ())) if n in rl.outputs]
                if not found:
                    raise PassError(f"The Render Layers node has no '{socket}' output for the {name} pass.")
                sockets[name] = (found[0], kind)
            if hasattr(out, "file_output_items"):       # 5.0
                out.directory = self.folder + os.sep
                for name, (socket, kind) in sockets.items():
                    out.file_output_items.new(kind, name)
                    tree.links.new(rl.outputs[socket], out.inputs[name])
            else:                                       # 4.x: file_slots, base_path
                out.base_path = self.folder + os.sep
                out.file_slots.clear()
                for name, (socket, _kind) in sockets.items():
                    out.file_slots.new(name)
                    tree.links.new(rl.outputs[socket], out.inputs[name])
        except Exception:
            self.restore()
            raise
        return self

    def _add_material_aovs(self) -> tuple[str, str]:
        """Add the roughness and base colour AOVs to the view layer and, to every material with a
        BSDF (:func:`material_bsdf`), nodes writing (roughness, 1, 0) to the first and the BSDF's
        diffuse base colour (:func:`_base_colour_output`) to the second.  Returns the AOVs' names
        (also the Render Layers outputs' names)."""
        layer = self.view_layer
        self._aov_index = layer.active_aov_index
        for name in (ROUGHNESS_AOV, BASE_COLOUR_AOV):
            aov = layer.aovs.add()
            aov.name = name             # Blender makes it unique if the user has an AOV of that name
            aov.type = "COLOR"
            self._aov_names.append(aov.name)
        rough_name, colour_name = self._aov_names
        for mat in bpy.data.materials:
            if not _uses_nodes(mat):
                continue
            tree = mat.node_tree
            bsdf = material_bsdf(tree)
            if bsdf is None:
                continue                # no value: the AOVs stay 0 on this material's pixels
            rough = _bsdf_roughness(bsdf)
            added = []
            comb = tree.nodes.new("ShaderNodeCombineXYZ")
            added.append(comb)
            comb.inputs["Y"].default_value = 1.0          # "this pixel has a value"
            comb.inputs["Z"].default_value = 0.0
            if isinstance(rough, float):
                comb.inputs["X"].default_value = rough
            else:
                tree.links.new(rough, comb.inputs["X"])
            colour = _base_colour_output(tree, bsdf, added)
            for aov_name, value in ((rough_name, comb.outputs["Vector"]), (colour_name, colour)):
                write = tree.nodes.new("ShaderNodeOutputAOV")
                added.append(write)
                write.aov_name = aov_name
                tree.links.new(value, write.inputs["Color"])
            self._material_nodes.extend((mat, n.name) for n in added)
        return rough_name, colour_name

    def _remove_material_aovs(self) -> None:
        for mat, name in reversed(self._material_nodes):
            try:
                node = mat.node_tree.nodes.get(name)
                if node is not None:
                    mat.node_tree.nodes.remove(node)       # its links go with it
            except (ReferenceError, RuntimeError, AttributeError) as exc:
                print(f"Fit Implicit: could not remove the pass node {name!r}: {exc}")
        self._material_nodes.clear()
        if self._aov_names:
            layer = self.view_layer
            try:
                for name in self._aov_names:
                    for aov in list(layer.aovs):
                        if aov.name == name:
                            layer.aovs.remove(aov)
                            break
                if self._aov_index < len(layer.aovs):
                    layer.active_aov_index = self._aov_index
            except (ReferenceError, RuntimeError, TypeError, ValueError) as exc:
                print(f"Fit Implicit: could not remove the passes' AOVs: {exc}")
            self._aov_names = []

    def prepare(self, prefix: str) -> None:
        """Name the next render's pass files ``<folder>/<prefix><pass>*.exr`` (old ones removed)."""
        for old in self._files(prefix):
            os.remove(old)
        if hasattr(self._node, "file_name"):
            self._node.file_name = prefix
        else:
            for slot, name in zip(self._node.file_slots, self._items):
                slot.path = prefix + name

    def _files(self, prefix: str) -> list[str]:
        return glob.glob(os.path.join(glob.escape(self.folder), glob.escape(prefix) + "*.exr"))

    def read(self, prefix: str, alpha: np.ndarray) -> dict[str, np.ndarray]:
        """The passes of the last render, converted to the Submit's passes.

        Args:
            alpha: (H, W) float32 coverage in [0, 1] of the beauty render.
        Returns:
            "albedo" (H, W, 3) uint8 sRGB; "normal" (H, W, 3) float32 unit world (0: none);
            "depth" (H, W) float32 z-depth in world units (0: none); "roughness" (H, W) float32
            in [0, 1] (protocol.NO_ROUGHNESS = -1: no surface, or its material has no
            roughness).  Top row first.
        """
        raw = {}
        for name in (*PASS_NAMES, BASE_COLOUR_ITEM):
            found = [f for f in self._files(prefix) if os.path.basename(f)[len(prefix):].startswith(name)]
            if len(found) != 1:
                raise PassError(f"The {name} pass was not written (looked for {prefix}{name}*.exr in {self.folder}).")
            raw[name] = load_float_image(found[0])
        return convert_passes(raw["albedo"], raw["normal"], raw["depth"][..., 0], alpha, raw["roughness"],
                              raw[BASE_COLOUR_ITEM])

    def restore(self) -> None:
        if self._tree is None and getattr(self, "_nodes", None):      # 4.x: remove our nodes
            tree = self.scene.node_tree
            for node in self._nodes:
                try:
                    tree.nodes.remove(node)
                except (ReferenceError, RuntimeError):
                    pass
        for owner, attr, value in reversed(self._saved):
            try:
                setattr(owner, attr, value)
            except Exception as exc:  # keep restoring the rest
                print(f"Fit Implicit: could not restore {attr}: {exc}")
        self._saved.clear()
        if self._tree is not None:
            bpy.data.node_groups.remove(self._tree)
            self._tree = None
        self._remove_material_aovs()

    def __exit__(self, *exc):
        self.restore()
        return False


def load_float_image(path: str) -> np.ndarray:
    """(H, W, 4) float32 pixels of an image file as stored (no colour transform for float
    files), top row first."""
    img = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = img.size
        c = img.channels
        if w == 0 or h == 0:
            raise PassError(f"Could not read the pass image {path}")
        px = np.empty(w * h * c, dtype=np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    px = px.reshape(h, w, c)[::-1]
    if c < 4:
        px = np.concatenate([px, np.ones((h, w, 4 - c), np.float32)], axis=-1)
    return np.ascontiguousarray(px)


def convert_passes(diffuse: np.ndarray, normal: np.ndarray, depth: np.ndarray, alpha: np.ndarray,
                   roughness: np.ndarray | None = None, base_colour: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """Cycles' raw passes -> the Submit's passes (see :meth:`PassOutput.read`).

    Args:
        diffuse: (H, W, >=3) float32 linear diffuse colour, coverage-weighted.
        normal: (H, W, >=3) float32 world normals, coverage-weighted.
        depth: (H, W) float32 z-depth, >= NO_SURFACE_DEPTH where nothing was hit.
        alpha: (H, W) float32 coverage in [0, 1].
        roughness: (H, W, >=2) float32 roughness AOV, coverage-weighted: R the roughness, G the
            share of samples that had one.  A pixel has a value where G > alpha / 2 (most of its
            surface has one); its roughness is R / G.  None: no value anywhere (all -1).
        base_colour: (H, W, >=3) float32 linear base colour AOV, coverage-weighted, written by
            the materials that write the roughness AOV: where that has a value the albedo is
            base_colour / G, elsewhere diffuse / alpha.  None: diffuse / alpha everywhere.
    """
    alpha = np.asarray(alpha, dtype=np.float32)
    covered = alpha > 0
    if roughness is not None:       # the share of samples whose material wrote the AOVs, and where most did
        g = roughness[..., 1].astype(np.float32)
        has_aov = covered & (g > 0.5 * np.maximum(alpha, 1e-3))
    albedo_lin = diffuse[..., :3] / np.maximum(alpha, 1e-3)[..., None]
    if roughness is not None and base_colour is not None:
        has_colour = has_aov & np.isfinite(base_colour[..., :3]).all(-1)
        albedo_lin = np.where(has_colour[..., None], base_colour[..., :3] / np.maximum(g, 1e-3)[..., None], albedo_lin)
    albedo = np.where(covered[..., None], color.linear_to_srgb(albedo_lin), 0.0)
    n = normal[..., :3].astype(np.float32)
    length = np.linalg.norm(n, axis=-1)
    has_normal = covered & (length > 1e-4)
    n = np.where(has_normal[..., None], n / np.maximum(length, 1e-12)[..., None], 0.0)
    z = np.asarray(depth, dtype=np.float32)
    z = np.where((z > 0) & (z < NO_SURFACE_DEPTH) & np.isfinite(z), z, 0.0)
    rough = np.full(alpha.shape, protocol.NO_ROUGHNESS, dtype=np.float32)
    if roughness is not None:
        r = roughness[..., 0].astype(np.float32)
        has_value = has_aov & np.isfinite(r)
        rough[has_value] = np.clip(r[has_value] / g[has_value], 0.0, 1.0)
    return {"albedo": np.clip(albedo * 255.0 + 0.5, 0, 255).astype(np.uint8),
            "normal": n.astype(np.float32), "depth": z.astype(np.float32), "roughness": rough}


def save_pass_files(folder: str, stem: str, passes: dict) -> dict:
    """Write one view's passes next to its image, as backend/fitting/data.py reads them (PASS_FILE_KEYS):
    ``<stem>_albedo.png`` (8-bit sRGB RGB), ``<stem>_normal.png`` (8-bit RGB, n = 2 v / 255 - 1,
    (0, 0, 0) = no surface), ``<stem>_depth.npz`` (float32 "depth", 0 = no surface) and
    ``<stem>_roughness.npz`` (float32 "roughness" in [0, 1], -1 = no value).
    Returns the frame keys (albedo_path, normal_path, depth_path, roughness_path: paths relative
    to ``folder``) of the passes given.  Main thread (bpy images)."""
    keys = {}
    if "albedo" in passes:
        keys["albedo_path"] = _save_rgb8(folder, f"{stem}_albedo.png", np.asarray(passes["albedo"], np.uint8), "sRGB")
    if "normal" in passes:
        n = np.asarray(passes["normal"], dtype=np.float32)
        v = np.clip(np.round((n + 1.0) * 127.5), 1, 255).astype(np.uint8)   # 0 is kept for "no surface"
        v[~n.any(axis=-1)] = 0
        keys["normal_path"] = _save_rgb8(folder, f"{stem}_normal.png", v, "Non-Color")
    if "depth" in passes:
        np.savez_compressed(os.path.join(folder, f"{stem}_depth.npz"),
                            depth=np.asarray(passes["depth"], dtype=np.float32))
        keys["depth_path"] = f"{stem}_depth.npz"
    if "roughness" in passes:
        np.savez_compressed(os.path.join(folder, f"{stem}_roughness.npz"),
                            roughness=np.asarray(passes["roughness"], dtype=np.float32))
        keys["roughness_path"] = f"{stem}_roughness.npz"
    return keys


def _save_rgb8(folder: str, rel: str, rgb: np.ndarray, colorspace: str) -> str:
    """An (H, W, 3) uint8 array as an 8-bit RGB PNG, bytes as given (top row first)."""
    h, w = rgb.shape[:2]
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = bpy.data.images.new("Implicit Pass", w, h, alpha=False)
    try:
        img.colorspace_settings.name = colorspace
        rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=-1)[::-1]
        img.pixels.foreach_set((rgba.astype(np.float32) / 255.0).ravel())
        img.filepath_raw = path
        img.file_format = "PNG"
        img.save()
    finally:
        bpy.data.images.remove(img)
    return rel
