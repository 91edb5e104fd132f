"""The secret that makes a .blend's jobs its own on a backend (shared/protocol.py Hello.token).

The backend tells a job's id, progress, results and model only to connections that say the
token the job was submitted with.  The token lives in the scene (a custom property), so it is
saved with the .blend: reopening the file reattaches to its jobs, renders and re-meshes its fits;
another file, or another artist's Blender on the same backend, cannot.
"""
import secrets

TOKEN_KEY = "implicit_client_token"


def scene_token(scene) -> str:
    """The scene's token (32 hex digits), made on first use."""
    token = scene.get(TOKEN_KEY)
    if not isinstance(token, str) or len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        token = secrets.token_hex(16)
        scene[TOKEN_KEY] = token
    return token
