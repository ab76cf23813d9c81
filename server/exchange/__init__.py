"""One request's life, local or remote alike: admit, cache, run, settle, observe; drain and cut on shutdown."""
