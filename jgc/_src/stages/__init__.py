"""The pipeline's stages: split -> plan -> (evaluate) -> estimate -> compare -> diagnose."""
