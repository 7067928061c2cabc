"""Watching the line: camera streams, videos and frame folders -> the model (through
`loomlens.predict`) -> debounced defect events in the event store, with pictures and alerts."""

from loomlens.watch.alerts import Alerter
from loomlens.watch.debounce import DebounceSettings, Debouncer
from loomlens.watch.media import Retention, check_media
from loomlens.watch.sources import open_source
from loomlens.watch.watcher import Watcher, predictor_detector

__all__ = ["Alerter", "DebounceSettings", "Debouncer", "Retention", "Watcher", "check_media", "open_source",
           "predictor_detector"]
