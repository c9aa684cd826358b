"""The Message-API ClientApp: the task NumPyClients behind the adapter."""

from flwr.clientapp import ClientApp

from .adapter import serve_numpy_client
from .nodes import make_client

app = serve_numpy_client(ClientApp(), make_client)
