"""The web side: the developer API blueprint, RFB over WebSocket, the page."""

from __future__ import annotations

from .backend import ApiBackend as ApiBackend
from .backend import ApiError as ApiError
from .backend import ApiSession as ApiSession
from .backend import ApiUser as ApiUser
from .blueprint import api_blueprint as api_blueprint
