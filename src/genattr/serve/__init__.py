"""The web service: `genattr serve` (FastAPI), its page, and the world's default index."""

from genattr.serve.app import Limits, create_app
from genattr.serve.world_index import default_world_index

__all__ = ["Limits", "create_app", "default_world_index"]
