"""The host as a service: HTTP handlers, the job queue and its lifecycle, the SQLite store, auth, config,
and the dashboard's static files."""
