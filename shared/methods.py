"""The fit methods and presets: the one definition both sides read (no imports, so the add-on
can build its panel from it at registration).

The panel lists METHOD_INFO / PRESET_INFO in their order, as (title, description); the wire
checks Submit.method / preset against METHODS / PRESETS; the backend's presets
(backend/fitting/config.py) and its command line take the names from here.
"""

METHODS = ("nerf", "sdf", "occupancy")
METHOD_INFO = {     # the recommended method first
    "sdf": ("Signed Distance", "NeuS-style signed distance field: clean surfaces (best for meshes)"),
    "occupancy": ("Occupancy", "Occupancy field rendered as opacity (UNISURF)"),
    "nerf": ("Radiance Field", "Density and colour (instant-ngp): best novel views, blobby meshes"),
}
PRESETS = ("draft", "standard", "high")
PRESET_INFO = {
    "draft": ("Draft", "Fast and coarse: a quick look"),
    "standard": ("Standard", "Balanced quality and time"),
    "high": ("High", "Slow: fine detail"),
}

# Photo captures (issue 15), Submit's settings of the same names: the background model outside the
# box (auto: on for photos without alpha or a camera inside the box), each photo's pose refined
# while fitting (focal: and the focal length, one factor shared by every photo).
BACKGROUND_MODES = ("auto", "on", "off")
CAMERA_REFINE_MODES = ("off", "on", "focal")

# Fits to points (issue 16), PointsJob.orientation and the setting points_orientation: use the
# points' normals where given (auto), require them (oriented), or ignore them (unoriented: SAL's
# sign-agnostic fit).
POINTS_ORIENTATIONS = ("auto", "oriented", "unoriented")

# Encodings of positions (issue 16), the setting ``encoding`` of every field
# (backend/fields/encodings.py says which to pick); the first is the default.
ENCODINGS = ("hashgrid", "fourier", "positional", "siren")
ENCODING_INFO = {
    "hashgrid": ("Hash Grid", "Multiresolution hash grid (instant-ngp): fastest to a sharp result"),
    "fourier": ("Fourier Features", "Gaussian Fourier features: smooth, few parameters; scale sets the detail"),
    "positional": ("Positional", "NeRF's positional encoding: sines and cosines of octaves"),
    "siren": ("SIREN", "Sine layers: smooth, with exact derivatives; slower to train"),
}
