"""The loomlens command line: a thin layer over the stages.

Every command takes plain flags (`--data DIR`) or ultralytics-style `key=value` words
(`data=DIR`); both spellings are equivalent. Heavy imports happen inside each command so
that `loomlens --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="loomlens",
    help="Fine-tune Florence-2 with LoRA to find fabric defects, and run it on the line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _expand_key_value_args(argv: list[str]) -> list[str]:
    """Turn `key=value` words into `--key value` (ultralytics style); leave the rest alone."""
    out: list[str] = []
    for arg in argv:
        if not arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
            if key and key.replace("_", "").replace("-", "").isalnum():
                out += [f"--{key.replace('_', '-')}", value]
                continue
        out.append(arg)
    return out


@app.command("serve")
def serve(
    model: str = typer.Option("tiny", help="Base model: tiny (embedded), base, large, a hub id or a folder."),
    adapter: str | None = typer.Option(None, help="A training run folder (or adapter folder) to attach."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(7860, help="TCP port."),
    api_key: str | None = typer.Option(
        None, envvar="LOOMLENS_API_KEY", show_envvar=True,
        help="Require this key on /v1/* (Authorization: Bearer KEY or X-API-Key) and as the page's password."),
    max_queue: int = typer.Option(16, min=1, help="Requests that may wait; more get 503 + Retry-After."),
    max_batch: int = typer.Option(4, min=1, help="Images the worker runs in one batch."),
    batch_wait_ms: float = typer.Option(5.0, min=0, help="How long the worker waits to fill a batch."),
    max_body_mb: float = typer.Option(20.0, min=0.001, help="Largest request body in MB (413 past it)."),
    max_megapixels: float = typer.Option(50.0, min=0.001, help="Largest image in megapixels (413 past it)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:0, mps."),
    page: bool = typer.Option(True, "--page/--no-page", help="Serve the web page at /."),
    examples: int = typer.Option(4, min=0, help="Synthetic loom frames in the page's example gallery."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    worker_delay_ms: float = typer.Option(0.0, hidden=True, help="Test only: sleep per batch."),
) -> None:
    """Serve the model: HTTP API at /v1 (docs at /docs), health at /healthz, web page at /."""
    import ipaddress
    import logging

    from loomlens.predict import Predictor
    from loomlens.serve import ServeSettings, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        typer.secho(f"warning: serving on {host} without an API key; anyone who reaches this port "
                    "can run the model (set --api-key or LOOMLENS_API_KEY)", fg="yellow", err=True)
    settings = ServeSettings(
        host=host, port=port, api_key=api_key or None, max_queue=max_queue, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, max_body_mb=max_body_mb,
        max_pixels=int(max_megapixels * 1_000_000), page=page, examples=examples,
        worker_delay_ms=worker_delay_ms,
    )
    predictor = Predictor(model=model, adapter=adapter, device=device)  # the one model load
    asgi = create_app(predictor, settings)
    import uvicorn

    typer.echo(f"loomlens serving {model}{' + ' + adapter if adapter else ''} on http://{host}:{port} "
               f"(page /, API /v1/predict, docs /docs)", err=True)
    uvicorn.run(asgi, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def main() -> None:
    """Console-script entry point."""
    sys.argv = [sys.argv[0], *_expand_key_value_args(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
