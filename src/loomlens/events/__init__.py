"""Defect events on the line: the store a watcher writes and the server reads (SQLAlchemy)."""

from loomlens.events.store import Event, EventStore, database_url

__all__ = ["Event", "EventStore", "database_url"]
