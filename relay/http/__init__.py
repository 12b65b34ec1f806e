"""The HTTP front end: the one-click endpoint, health, metrics and the admin API and dashboard."""
