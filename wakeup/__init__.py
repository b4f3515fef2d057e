"""pgwake control plane: control API, control DB, endpoint lifecycle and provisioners."""
