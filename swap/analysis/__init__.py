"""The paper's analysis: figures from run directories."""


__all__ = []
