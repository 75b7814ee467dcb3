"""Distillation methods and their building blocks (losses, PAT modules)."""
