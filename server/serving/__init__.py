"""Protocol <-> engine translation per endpoint family. Never imports Litestar or torch."""
