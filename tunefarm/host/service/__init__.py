"""The host as a service (``tunefarm host serve``): app (wiring, routes, event loop), handlers (HTTP only),
jobs (the queue, submission rules, workers), views (what the API shows), store (SQLite), auth (token,
sign-in), tracker_proc (the host's tracker), farmdir (LOGS/farm/), config, and the dashboard's static/."""
