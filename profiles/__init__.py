"""Built-in device profiles (one TOML per device), shipped as `edgeqra.builtin_profiles`."""
