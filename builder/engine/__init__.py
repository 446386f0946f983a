"""The build: plan (pure, no torch), stage runner, DVC generation and resolve, launch."""
