"""jgc's implementation, private: it may change without notice (docs/architecture.md maps it)."""
