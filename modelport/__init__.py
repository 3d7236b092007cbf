"""modelport: put a trained image model into production in minutes."""

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "Prediction", "import_model"]


def __getattr__(name: str):
    # Imported on first use: `import modelport` stays cheap for the CLI and the server.
    if name in ("Client", "AsyncClient"):
        from modelport import client

        return getattr(client, name)
    if name == "import_model":
        from modelport.importer import import_model

        return import_model
    if name == "Prediction":
        from modelport.engine.predictions import Prediction

        return Prediction
    raise AttributeError(f"module 'modelport' has no attribute {name!r}")
