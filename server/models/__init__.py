"""The models file: which models a server serves, local engines and remote upstreams."""
