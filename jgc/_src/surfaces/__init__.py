"""The public entry points: each describes what it checks and runs the pipeline's stages."""
