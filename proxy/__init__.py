"""pgwake proxy: wake-on-connect front door that speaks the PostgreSQL protocol."""
