"""Serving on the line: the HTTP API (FastAPI) and the web page (Gradio) in one app.

`create_app(predictor, settings)` builds it; `loomlens serve` runs it with uvicorn. The model is
reached only through `loomlens.predict`.
"""

from loomlens.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
