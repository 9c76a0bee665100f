"""The laptop side: FarmClient (the host service's HTTP API) and the commands built on it."""
