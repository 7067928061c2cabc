"""The web page (Gradio): upload or webcam, every Florence-2 task, the drawn result and a table.

The page runs the model the same way the API does: its handler validates with the same code
and puts the image on the same bounded queue, so the page can neither bypass the queue nor
decode a decompression bomb (the image arrives as a file path and goes through
`images.decode_image`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gradio as gr

from loomlens.events.store import EventStore
from loomlens.predict.draw import draw_prediction
from loomlens.serve.errors import InputError
from loomlens.serve.events import LINE_HEADERS, WINDOWS, line_view
from loomlens.serve.results import TABLE_HEADERS, table_rows
from loomlens.serve.tasks import TASKS

log = logging.getLogger("loomlens.serve")

CSS = """
#run-button {min-height: 48px}
#status {min-height: 1.5em}
"""


def example_frames(folder: Path, count: int = 4, seed: int = 7) -> list[str]:
    """Synthetic loom frames for the example gallery, made once into `folder` (same seed, same
    bytes), frames with defects first."""
    folder = Path(folder) / f"synth-seed{seed}-n{count}"
    listing = folder / "examples.txt"
    if listing.exists():
        paths = [line for line in listing.read_text().splitlines() if line]
        if paths and all(Path(p).exists() for p in paths):
            return paths
    from loomlens.data.synth import synthesize

    records = synthesize(folder, images=count, seed=seed, negative_fraction=0.25)
    records = sorted(records, key=lambda r: not r.boxes)  # defects first, stable otherwise
    paths = [str((folder / r.image).resolve()) for r in records]
    listing.write_text("\n".join(paths) + "\n")
    return paths


def status_line(result: dict, ms: float) -> str:
    """The line under a result (markdown): task, size, what was found and in how long, tiling,
    the frame's defect probability for `od`, and a warning for a task the model was not trained for."""
    n_boxes, n_polys = len(result["detections"]), len(result["polygons"])
    parts = [f"{n_boxes} detection{'s' if n_boxes != 1 else ''}"]
    if n_polys:
        parts.append(f"{n_polys} polygon{'s' if n_polys != 1 else ''}")
    status = (f"**{TASKS[result['task']].title}** on a {result['width']}x{result['height']} image: "
              f"{', '.join(parts)} in {ms:.0f} ms")
    if result["tiled"]:
        status += " (tiled)"
    if result["task"] == "od" and result["answer_probability"] is not None:
        status += f"; defect probability {result['answer_probability']:.2f}"
    if not result["trained"]:
        status += ". *This model was not fine-tuned for this task; its answer may be noise.*"
    return status


def build_page(service, examples: list[str], title: str = "loomlens: fabric defects",
               events: EventStore | None = None) -> gr.Blocks:
    """`service.run(data: bytes, task, text, tile, score_threshold) -> (image, prediction, result)`
    is the one call into the model (see app.Service); it raises `InputError` for bad input.
    With `events` (the watchers' database) a Line tab shows the recent defect events."""
    choices = [(f"{t.title} ({t.name})", t.name) for t in TASKS.values()]

    def on_task(task: str):
        info = TASKS.get(task)
        needs = info is not None and info.text is not None
        return gr.update(
            label="Text input (needed)" if needs else "Text input (not used by this task)",
            placeholder=info.hint if needs else "",
            interactive=True,
        )

    def on_run(image_path, task, text, threshold):
        if not image_path:
            raise gr.Error("Upload an image, take a webcam snapshot or pick an example first.",
                           print_exception=False)
        started = time.perf_counter()
        try:
            data = Path(image_path).read_bytes()
            image, prediction, result = service.run(data, task, text, "auto", threshold)
        except InputError as exc:
            raise gr.Error(exc.message, title=f"{exc.status} {exc.code}", print_exception=False) from None
        drawn = draw_prediction(image, prediction)
        status = status_line(result, 1000 * (time.perf_counter() - started))
        return drawn, table_rows(result), result["text"], status

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"# {title}\nPick a task, upload a frame (or use the webcam), press **Run**. "
                    "The same model answers `POST /v1/predict`; see [/docs](/docs) for the API.")
        with gr.Tab("Predict", id="predict"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    task = gr.Dropdown(choices=choices, value="od", label="Task", elem_id="task")
                    # image_mode=None: Gradio hands over the uploaded file as it came; its own RGB
                    # conversion clips a 16-bit or float grey frame to white (decode_image scales it)
                    image = gr.Image(sources=["upload", "webcam"], type="filepath", image_mode=None,
                                     label="Input image", elem_id="input-image", height=360)
                    text = gr.Textbox(label="Text input (not used by this task)", lines=1, max_lines=3,
                                      elem_id="text-input")
                    threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Score threshold",
                                          elem_id="threshold")
                    with gr.Row():
                        clear = gr.ClearButton(value="Clear")
                        run = gr.Button("Run", variant="primary", elem_id="run-button")
                with gr.Column(scale=1):
                    output_image = gr.Image(type="pil", format="jpeg", label="Result", interactive=False,
                                            buttons=["download", "fullscreen"],
                                            elem_id="output-image", height=360)
                    status = gr.Markdown("", elem_id="status")
                    table = gr.Dataframe(headers=TABLE_HEADERS, value=[], type="array",
                                         label="Detections", interactive=False, elem_id="detections",
                                         wrap=True)
                    output_text = gr.Textbox(label="Output text", lines=2, interactive=False,
                                             elem_id="output-text")
            if examples:
                gr.Examples(examples=[[p] for p in examples], inputs=[image],
                            label="Examples: synthetic loom frames", examples_per_page=8)
            clear.add([image, text, output_image, table, output_text, status])
            task.change(on_task, inputs=task, outputs=text)
            run.click(on_run, inputs=[image, task, text, threshold],
                      outputs=[output_image, table, output_text, status], api_name="predict")
        if events is not None:
            with gr.Tab("Line", id="line"):
                build_line_view(page, events)
    return page


def build_line_view(page, events: EventStore, refresh_s: float = 5.0) -> None:
    """The Line view, inside `page` (the current Blocks): the newest events' crops and a table,
    by camera, class and time window, read from the events database when the page opens and
    every `refresh_s` seconds after."""

    def choices(column: str) -> list[str]:
        return ["all", *events.distinct(column)]

    def refresh(camera, label, window):
        gallery, rows = line_view(events, camera=camera, label=label, window=window)
        return (gallery, rows, gr.update(choices=choices("camera")), gr.update(choices=choices("label")),
                f"{len(rows)} event{'s' if len(rows) != 1 else ''} shown")

    gr.Markdown("Defect events the watchers (`loomlens watch`) recorded, newest first; this view "
                "refreshes by itself. Full frames: `GET /v1/events/{id}/image`.")
    with gr.Row():
        camera = gr.Dropdown(choices=choices("camera"), value="all", label="Camera", elem_id="line-camera")
        label = gr.Dropdown(choices=choices("label"), value="all", label="Class", elem_id="line-class")
        window = gr.Dropdown(choices=list(WINDOWS), value="last 24 hours", label="Time", elem_id="line-window")
    count = gr.Markdown("", elem_id="line-count")
    gallery = gr.Gallery(label="Recent events", columns=6, height=320, elem_id="line-gallery")
    table = gr.Dataframe(headers=LINE_HEADERS, value=[], type="array", interactive=False, label="Events",
                         elem_id="line-events")
    outputs = [gallery, table, camera, label, count]
    page.load(refresh, inputs=[camera, label, window], outputs=outputs, show_progress="hidden")
    timer = gr.Timer(refresh_s)
    timer.tick(refresh, inputs=[camera, label, window], outputs=outputs, show_progress="hidden")
    for control in (camera, label, window):
        control.change(refresh, inputs=[camera, label, window], outputs=outputs)


def theme():
    return gr.themes.Default(primary_hue="orange")
