"""realtime: a PostgreSQL database as a live API (REST CRUD plus gap-free WebSocket change streams)."""

__version__ = "0.1.0"
