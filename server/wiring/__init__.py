"""How the app's parts are built from settings: the gateway's collaborators, the data directory."""
