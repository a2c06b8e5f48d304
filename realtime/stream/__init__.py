"""The change pipeline: SQL captures (triggers/), one listener per process reads the changelog, the hub matches
changes to subscriptions and queues encoded frames on each connection, whose own writer task sends them."""
