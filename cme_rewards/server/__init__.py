"""HTTP reward server (``cme-rewards serve``): OpenRLHF's ``/get_reward`` protocol and a native batch API.

``create_app`` builds the FastAPI app around a loaded ``CMEScorer``; ``cli.main`` runs it with uvicorn.
"""

from cme_rewards.server.app import ServerConfig, create_app
from cme_rewards.server.options import ServerOptions

__all__ = ["ServerConfig", "ServerOptions", "create_app"]
