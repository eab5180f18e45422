"""Evaluating the user's function: at perturbed points (dense, structured, host), and its autodiff.

This package's __init__ imports nothing: `import jgc` imports the on-disk cache module from here
without importing JAX.
"""
