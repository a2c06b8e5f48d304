"""The users resource: REST CRUD over the `users` table."""
